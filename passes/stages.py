"""Split a model into pipeline stages at its repeated blocks, as fx GraphModules captured on the meta device.

Each stage runs a contiguous range of the model's repeated blocks (transformer layers) and holds only the
weights it uses. Values the prelude builds without parameters (causal masks from ``arange`` comparisons,
rotary cos/sin from buffers) are recomputed inside every stage that needs them, so the attention finder
still sees the dataflow that builds each mask; values with parameters in their ancestry travel between
stages as activations (a value one stage makes and a later one needs is passed through the stages between).

Weights: a stage holds the model's own tensors (never copies). Parameters that are meta stay meta until
``materialise`` loads them (``passes.stage_weights`` reads them from a safetensors checkpoint). A tied
tensor is held under the name of the module that reads it (``lm_head.weight`` in the last stage, the
embedding's name in the first); a buffer the prelude's recomputed values read (rotary ``inv_freq``) is held
by every stage that recomputes them; a tensor forward never reads is in no stage.

Shapes: the capture is static, so the stages serve the example inputs' shapes (batch and length); split
again for others. Activations are named by the captured graph's node names, the same in every process that
splits the same model on the same shapes with the same torch.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind

from passes import graph as G
from passes.capture import CaptureError, capture, split_inputs
from passes.graph import WRAPPED
from passes.stage_weights import materialise, meta_parameters, safetensors_loader

logger = logging.getLogger(__name__)

__all__ = ["Stage", "split_stages", "run_stages", "place", "materialise", "meta_parameters", "safetensors_loader"]

META = torch.device("meta")
CONSTANTS = "_stage_constants"  # attribute under which a stage keeps the tensor constants export lifted


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a GraphModule running blocks [first, last) and the names it trades."""

    index: int
    count: int  # number of stages
    module: fx.GraphModule  # forward(**kw) over `inputs`; a tuple per `sent`, or the model's output (last stage)
    inputs: tuple[str, ...]  # its placeholders' names, in order
    model_inputs: tuple[str, ...]  # those of `inputs` that are the model's own keyword inputs
    received: tuple[str, ...]  # those of `inputs` the previous stage sent, in its order
    sent: tuple[str, ...]  # activations it returns for the next stage (empty for the last stage)
    weights: tuple[str, ...]  # the model's state-dict names of every parameter and buffer the module holds
    blocks: tuple[int, int]  # the repeated blocks it runs, [first, last)


@dataclass(frozen=True)
class Blocks:
    """The model's repeated blocks: the ModuleList's path and each block's parameter count."""

    path: str
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class _Source:
    """Where a placeholder of the captured graph comes from."""

    kind: str  # "input" | "parameter" | "buffer" | "constant" | "unused"
    name: str  # keyword name (input), canonical state-dict name (parameter, buffer), constant's key (constant)
    persistent: bool = True  # a buffer the model's state dict holds


def split_stages(model: nn.Module, example_inputs: Any, count: int) -> list[Stage]:
    """Split ``model`` into ``count`` pipeline stages at its repeated blocks, balanced by parameter count."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive number of stages, got {count!r}; pass count >= 1")
    blocks = find_blocks(model)
    if count > len(blocks.sizes):
        raise ValueError(f"cannot split {len(blocks.sizes)} repeated blocks (at {blocks.path!r}) into {count} "
                         f"stages; pass count <= {len(blocks.sizes)}")
    ep, kw = _capture_on_meta(model, example_inputs)
    device = _device_of(example_inputs)
    sources = _sources(ep, kw)
    nodes = [n for n in ep.graph.nodes if n.op not in ("placeholder", "output")]
    block_of = _block_of(nodes, blocks)
    head, tail = _end_weights(nodes, block_of, sources)
    ranges = balance(blocks.sizes, count, head, tail)
    logger.info("splitting %d blocks at %r into stages %s", len(blocks.sizes), blocks.path, ranges)
    owner = _owners(nodes, block_of, ranges)
    # the capture's copy of a plain tensor attribute is meta; the stage holds the model's own
    attributes = _tensor_attributes(model)
    constants = {k: attributes.get(_strip(k), v) for k, v in ep.constants.items()}
    plan = _Plan(ep, sources, owner, count, constants)
    tensors = _model_tensors(model)
    aliases = _aliases(model)
    linears = _linears(model)
    stages = []
    for s in range(count):
        gm, model_inputs, weights = _build(plan, s, tensors, aliases, device, linears)
        stages.append(Stage(index=s, count=count, module=gm, inputs=model_inputs + tuple(plan.received[s]),
                            model_inputs=model_inputs, received=tuple(plan.received[s]), sent=tuple(plan.sent[s]),
                            weights=weights, blocks=ranges[s]))
    return stages


def run_stages(stages: list[Stage], kw: dict) -> Any:
    """Chain the stages in this process on the model's keyword inputs ``kw``: the reference for model(**kw)."""
    if not stages or [s.index for s in stages] != list(range(stages[0].count)):
        raise ValueError("run_stages needs every stage of one split, in order (the list split_stages returned)")
    carried: tuple = ()
    out: Any = None
    for stage in stages:
        missing = [n for n in stage.model_inputs if n not in kw]
        if missing:
            raise ValueError(f"stage {stage.index} needs the model inputs {missing}; pass them in kw by keyword")
        args = {n: kw[n] for n in stage.model_inputs}
        args.update(zip(stage.received, carried))
        out = stage.module(**args)
        carried = tuple(out) if stage.index < stage.count - 1 else ()
    return out


def place(stage: Stage, device: torch.device | str) -> None:
    """Move ``stage``'s real tensors to ``device`` (meta ones stay meta) and point its graph's device literals there."""
    device = torch.device(device)
    moved: dict[int, torch.Tensor] = {}  # one move per tensor, so tied names stay one tensor
    for owner, field, t, is_param in _slots(stage.module):
        if t.is_meta or t.device == device:
            continue
        if id(t) not in moved:
            value = t.detach().to(device)
            moved[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) if is_param else value
        (owner._parameters if is_param else owner._buffers)[field] = moved[id(t)]
    # Ops that create tensors (arange, ones, to) name the device the capture ran on.
    for n in stage.module.graph.nodes:
        n.args, n.kwargs = _retarget((n.args, n.kwargs), None, device)
    stage.module.recompile()


def find_blocks(model: nn.Module) -> Blocks:
    """The repeated blocks: the ModuleList of modules of one class holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(c) for c in mod}) != 1:
            continue
        total = sum(p.numel() for p in mod.parameters())
        if total and (best is None or total > best[0]):
            best = (total, path, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of modules of one class "
                         "holding parameters) to split into stages; keep its layers in an nn.ModuleList")
    _, path, blocks = best
    return Blocks(path, tuple(sum(p.numel() for p in b.parameters()) for b in blocks))


def balance(sizes: tuple[int, ...], count: int, head: int = 0, tail: int = 0) -> list[tuple[int, int]]:
    """Contiguous block ranges, one per stage, with the least largest load and then the most even loads.

    ``head`` and ``tail`` are the parameters the first and last stage hold outside the blocks (embedding, head).
    """
    n = len(sizes)
    pre = [0]
    for s in sizes:
        pre.append(pre[-1] + s)

    def load(s: int, a: int, b: int) -> int:
        return pre[b] - pre[a] + (head if s == 0 else 0) + (tail if s == count - 1 else 0)

    def best(cost: Callable[[int, int, int, float], float], limit: float) -> list[tuple[int, int]]:
        # table[s][j]: the best value of putting blocks [0, j) into stages 0..s, and where stage s starts
        inf = float("inf")
        table = [[(inf, -1)] * (n + 1) for _ in range(count)]
        for j in range(1, n + 1):
            if load(0, 0, j) <= limit:
                table[0][j] = (cost(0, 0, j, 0), 0)
        for s in range(1, count):
            for j in range(s + 1, n + 1):
                for i in range(s, j):
                    prev = table[s - 1][i][0]
                    if prev < inf and load(s, i, j) <= limit:
                        table[s][j] = min(table[s][j], (cost(s, i, j, prev), i))
        ranges, j = [], n
        for s in range(count - 1, -1, -1):
            i = table[s][j][1]
            ranges.append((i, j))
            j = i
        return ranges[::-1]

    # First the least largest load, then, among splits within it, the least sum of squares: a tie in the
    # largest load goes to the split that leaves the other stages most even.
    first = best(lambda s, i, j, prev: max(prev, load(s, i, j)), float("inf"))
    limit = max(load(s, a, b) for s, (a, b) in enumerate(first))
    return best(lambda s, i, j, prev: prev + load(s, i, j) ** 2, limit)


def _capture_on_meta(model: nn.Module, example_inputs: Any) -> tuple[torch.export.ExportedProgram, dict]:
    """Export ``model`` with every tensor of it and of the inputs swapped to meta; returns (program, keywords)."""
    meta = pytree.tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, device=META), example_inputs)
    with _swapped_to_meta(model):
        try:
            ep, spec = capture(model, meta)
        except CaptureError as e:
            raise ValueError(f"cannot split {type(model).__name__}: {e}") from e
    return ep, spec.bind(*split_inputs(meta))


@contextlib.contextmanager
def _swapped_to_meta(model: nn.Module) -> Iterator[None]:
    """Every parameter, buffer and plain tensor attribute of ``model`` replaced by a meta copy (ties kept)."""
    slots = [(d, k, v) for m in model.modules() for d in (m._parameters, m._buffers) for k, v in d.items()
             if v is not None]
    # A tensor kept as a plain attribute (self.scale = torch.tensor(...)) is a constant to export; a real
    # one among meta tensors would stop the capture on a device mismatch.
    slots += [(m.__dict__, k, v) for m in model.modules() for k, v in list(m.__dict__.items())
              if isinstance(v, torch.Tensor)]
    copies: dict[int, torch.Tensor] = {}
    for _, _, v in slots:
        if id(v) not in copies:
            t = v.detach().to(META)
            copies[id(v)] = nn.Parameter(t, requires_grad=v.requires_grad) if isinstance(v, nn.Parameter) else t
    try:
        for d, k, v in slots:
            d[k] = copies[id(v)]
        yield
    finally:
        for d, k, v in slots:
            d[k] = v


def _device_of(example_inputs: Any) -> torch.device:
    """The device the stages run on: the example inputs' (cpu when they hold no tensor)."""
    leaves = [t for t in pytree.tree_leaves(split_inputs(example_inputs)) if isinstance(t, torch.Tensor)]
    return leaves[0].device if leaves else torch.device("cpu")


def _strip(name: str) -> str:
    """A path or state-dict name without the prefix of capture's wrapper module."""
    return name[len(WRAPPED) + 1:] if name.startswith(WRAPPED + ".") else name


def _sources(ep: torch.export.ExportedProgram, kw: dict) -> dict[fx.Node, _Source]:
    """What each placeholder of the program stands for."""
    sig = ep.graph_signature
    if any(o.kind != OutputKind.USER_OUTPUT for o in sig.output_specs):
        raise ValueError("cannot split a model whose forward writes to its buffers or inputs (e.g. batch norm in "
                         "training mode, a cache); call model.eval() and pass no cache")
    paths = [path for path, _ in pytree.tree_flatten_with_path(((), kw))[0]]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out: dict[fx.Node, _Source] = {}
    user = 0
    for spec in sig.input_specs:
        node = placeholders[spec.arg.name] if hasattr(spec.arg, "name") else None
        if spec.kind == InputKind.USER_INPUT:
            path = paths[user]
            user += 1
            if node is None:
                continue
            if len(path) != 2 or not isinstance(path[1], pytree.MappingKey):
                if node.users:
                    raise ValueError(f"cannot split a model whose input {pytree.keystr(path)} is nested in a "
                                     "structure; pass tensors as keyword inputs")
                out[node] = _Source("unused", "")
                continue
            out[node] = _Source("input", str(path[1].key))
        elif spec.kind == InputKind.PARAMETER:
            out[node] = _Source("parameter", _strip(spec.target))
        elif spec.kind == InputKind.BUFFER:
            out[node] = _Source("buffer", _strip(spec.target), persistent=spec.persistent is not False)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            out[node] = _Source("constant", spec.target)
        elif node is not None and node.users:
            raise ValueError(f"cannot split a graph with a {spec.kind.name} input ({spec.arg.name}); "
                             "stages hold tensors only")
    return out


def _block_of(nodes: list[fx.Node], blocks: Blocks) -> dict[fx.Node, int]:
    """The block each node ran in, from its module stack; checks the blocks run one after another."""
    prefix = blocks.path + "." if blocks.path else ""
    out: dict[fx.Node, int] = {}
    for n in nodes:
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            path = _strip(path)
            if path.startswith(prefix):
                head = path[len(prefix):].split(".", 1)[0]
                if head.isdigit():
                    out[n] = int(head)
                    break
    order = list(out.values())
    if not order:
        raise ValueError(f"the graph shows no op inside the repeated blocks at {blocks.path!r}; split a model whose "
                         "forward calls them")
    if any(b < a for a, b in zip(order, order[1:])):
        raise ValueError(f"the repeated blocks at {blocks.path!r} do not run one after another (a block runs again "
                         "after a later one); such a model cannot be cut into contiguous stages")
    return out


def _end_weights(nodes: list[fx.Node], block_of: dict[fx.Node, int], sources: dict[fx.Node, _Source]
                 ) -> tuple[int, int]:
    """Parameters used before the first block's ops (embeddings) and after the last block's (head)."""
    marks = [i for i, n in enumerate(nodes) if n in block_of]

    def used(part: list[fx.Node]) -> int:
        seen = {a for n in part for a in n.all_input_nodes if a in sources and sources[a].kind == "parameter"}
        return sum(G.val(a).numel() for a in seen)

    return used(nodes[:marks[0]]), used(nodes[marks[-1] + 1:])


def _owners(nodes: list[fx.Node], block_of: dict[fx.Node, int], ranges: list[tuple[int, int]]) -> dict[fx.Node, int]:
    """The stage that runs each op: its block's; an op outside the blocks goes with the next block's op."""
    stage_of = {b: s for s, (a, z) in enumerate(ranges) for b in range(a, z)}
    out: dict[fx.Node, int] = {}
    nxt = len(ranges) - 1  # ops after the last block (final norm, head) run in the last stage
    for n in reversed(nodes):
        if n in block_of:
            nxt = stage_of[block_of[n]]
        out[n] = nxt
    return out


class _Plan:
    """Which ops each stage runs, which it recomputes, and the activations stages trade."""

    def __init__(self, ep: torch.export.ExportedProgram, sources: dict[fx.Node, _Source],
                 owner: dict[fx.Node, int], count: int, constants: dict[str, Any]):
        self.ep, self.sources, self.count, self.constants = ep, sources, count, constants
        self.output = next(n for n in ep.graph.nodes if n.op == "output")
        owner = {**owner, self.output: count - 1}
        self.free = _parameter_free(ep.graph, sources)
        self.runs: list[set[fx.Node]] = [set() for _ in range(count)]
        for n, s in owner.items():
            self.runs[s].add(n)
        needed: dict[fx.Node, set[int]] = {}  # activation -> stages that read it
        for s in range(count):
            for n in list(self.runs[s]):
                for a in n.all_input_nodes:
                    if a.op == "placeholder" or owner[a] == s:
                        continue
                    if self.free[a]:
                        self.runs[s] |= _ancestry(a)  # recomputed here: cheap, and keeps masks visible
                    else:
                        needed.setdefault(a, set()).add(s)
        order = {n: i for i, n in enumerate(ep.graph.nodes)}
        self.sent: list[list[str]] = [[] for _ in range(count)]
        self.carried: list[list[fx.Node]] = [[] for _ in range(count)]
        for a in sorted(needed, key=order.__getitem__):
            for s in range(owner[a], max(needed[a])):
                self.carried[s].append(a)
                self.sent[s].append(a.name)
        self.received = [[]] + [list(names) for names in self.sent[:-1]]
        self.model_inputs: list[list[str]] = []
        for s in range(count):
            used = {a for n in self.runs[s] for a in n.all_input_nodes
                    if a.op == "placeholder" and sources.get(a, _Source("", "")).kind == "input"}
            self.model_inputs.append([sources[a].name for a in sorted(used, key=order.__getitem__)])
            clash = set(self.model_inputs[s]) & set(self.received[s])
            if clash:
                raise ValueError(f"cannot name stage {s}'s inputs: {sorted(clash)} is both a model input and an "
                                 "activation; rename the model's keyword argument")


def _parameter_free(graph: fx.Graph, sources: dict[fx.Node, _Source]) -> dict[fx.Node, bool]:
    """For each node: whether its ancestry holds no parameter and no random op (so any stage may recompute it)."""
    out: dict[fx.Node, bool] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            out[n] = n not in sources or sources[n].kind != "parameter"
        elif n.op == "call_function":
            tags = getattr(n.target, "tags", ())
            out[n] = torch.Tag.nondeterministic_seeded not in tags and all(out[a] for a in n.all_input_nodes)
        else:
            out[n] = all(out[a] for a in n.all_input_nodes)
    return out


def _ancestry(node: fx.Node) -> set[fx.Node]:
    """``node`` and every op it is computed from (placeholders excluded)."""
    out: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in out or n.op == "placeholder":
            continue
        out.add(n)
        stack.extend(n.all_input_nodes)
    return out


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by each of its state-dict names (tied names included)."""
    return {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}


def _tensor_attributes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain tensor attributes of ``model``'s modules (neither parameters nor buffers), by dotted name."""
    return {f"{path}.{k}" if path else k: v for path, m in model.named_modules(remove_duplicate=False)
            for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each name of a tensor, every name the same tensor has in ``model`` (tied weights share one)."""
    by_id: dict[int, list[str]] = {}
    for name, t in _model_tensors(model).items():
        by_id.setdefault(id(t), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _alias_for(names: list[str], user: fx.Node) -> str:
    """The name of a tied tensor under the module that uses it (lm_head.weight for the head, not the embedding)."""
    path = _strip(G.module_path(user))
    best, depth = names[0], -1
    for name in names:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner == "" or path == owner or path.startswith(owner + "."):
            d = len(owner.split(".")) if owner else 0
            if d > depth:
                best, depth = name, d
    return best


def _linears(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """Weight name -> (path, has bias) of every ``nn.Linear`` of ``model``."""
    return {f"{path}.weight": (path, m.bias is not None) for path, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, nn.Linear) and path}


def _linear_call(n: fx.Node, names: Callable[[fx.Node], str | None],
                 linears: dict[str, tuple[str, bool]]) -> str | None:
    """The path of the model's ``nn.Linear`` that ``n`` (an ``aten.linear`` call) applies, when it is exactly one."""
    if n.op != "call_function" or n.target is not torch.ops.aten.linear.default or n.kwargs:
        return None
    weight, bias = n.args[1], (n.args[2] if len(n.args) > 2 else None)
    found = linears.get(names(weight) or "")
    if found is None:
        return None
    path, has_bias = found
    if has_bias != (bias is not None) or (bias is not None and names(bias) != f"{path}.bias"):
        return None
    return path


def _build(plan: _Plan, s: int, tensors: dict[str, torch.Tensor], aliases: dict[str, list[str]],
           device: torch.device, linears: dict[str, tuple[str, bool]],
           ) -> tuple[fx.GraphModule, tuple[str, ...], tuple[str, ...]]:
    """Stage ``s`` as a GraphModule holding the model's tensors it uses: (module, model inputs, weight names).

    A call of one of the model's ``nn.Linear`` modules stays a call of an ``nn.Linear`` at the same path, so
    passes that replace a projection module (the latent weight surgery) work on a stage as on the model.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_input = {src.name: n for n, src in plan.sources.items() if src.kind == "input"}
    for name in plan.model_inputs[s]:
        env[by_input[name]] = _placeholder(graph, name)
    if s > 0:
        for a in plan.carried[s - 1]:
            env[a] = _placeholder(graph, a.name)
    attrs: dict[str, tuple[Any, bool]] = {}  # attribute name -> (value, persistent)
    getters: dict[str, fx.Node] = {}

    def attr(a: fx.Node, user: fx.Node) -> fx.Node:
        src = plan.sources.get(a)
        if src is None or src.kind not in ("parameter", "buffer", "constant"):
            raise ValueError(f"cannot split: stage {s} reads {a.name}, which no earlier stage sends (a graph the "
                             "splitter does not handle)")
        if src.kind == "constant":
            name, value, persistent = f"{CONSTANTS}.{src.name.replace('.', '_')}", plan.constants[src.name], False
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise ValueError(f"cannot split: the model makes the tensor constant {src.name} on the inputs' "
                                 "device during forward, and a meta capture loses its value; register it as a "
                                 "buffer instead")
        else:
            name = _alias_for(aliases.get(src.name, [src.name]), user)
            value, persistent = tensors[name], src.persistent
        if name not in getters:
            attrs[name] = (value, persistent)
            getters[name] = graph.get_attr(name)
        return getters[name]

    def tensor_name(a: Any, user: fx.Node) -> str | None:
        src = plan.sources.get(a) if isinstance(a, fx.Node) else None
        if src is None or src.kind != "parameter":
            return None
        name = _alias_for(aliases.get(src.name, [src.name]), user)
        return name if isinstance(tensors.get(name), nn.Parameter) else None

    modules: dict[str, nn.Linear] = {}
    for n in plan.ep.graph.nodes:
        if n not in plan.runs[s] or n is plan.output:
            continue

        def arg(a: fx.Node, user: fx.Node = n) -> fx.Node:
            return env[a] if a in env else attr(a, user)

        path = _linear_call(n, lambda a, user=n: tensor_name(a, user), linears)
        if path is not None:
            modules[path] = _as_linear(tensors[f"{path}.weight"], tensors.get(f"{path}.bias"))
            env[n] = graph.call_module(path, (arg(n.args[0]),))
            env[n].meta = dict(n.meta)
            continue

        if n.op == "get_attr":  # a higher-order op's subgraph (torch.cond branches)
            attrs[n.target] = (getattr(plan.ep.graph_module, n.target), True)
        copy = graph.node_copy(n, arg)
        copy.args, copy.kwargs = _retarget((copy.args, copy.kwargs), META, device)
        env[n] = copy
    if s == plan.count - 1:
        flat = plan.output.args[0]
        graph.output(tuple(fx.map_arg(flat, lambda a: env[a] if a in env else attr(a, plan.output))))
    else:
        graph.output(tuple(env[a] for a in plan.carried[s]))
    graph.eliminate_dead_code(is_impure_node=lambda x: x.op != "call_module" and x.is_impure())
    # Ops only later stages needed (and recompute there) are gone; so are the model inputs only they read.
    for n in [n for n in graph.nodes if n.op == "placeholder" and not n.users and n.target in plan.model_inputs[s]]:
        graph.erase_node(n)
    used = [n.target for n in graph.nodes if n.op == "get_attr"]
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    root = nn.Module()
    for path in called:
        _register(root, path, modules[path])
    for name in used:
        _register(root, name, attrs[name][0])
    gm = fx.GraphModule(root, graph, class_name=f"Stage{s}")
    for name in used:
        if not attrs[name][1]:
            owner, field = _owner(gm, name)
            owner._non_persistent_buffers_set.add(field)
    if s == plan.count - 1:
        _keep_output_structure(gm, plan)
    model_inputs = tuple(n.target for n in graph.nodes if n.op == "placeholder" and n.target in plan.model_inputs[s])
    held = [f"{p}.{k}" for p in called for k, _ in modules[p].named_parameters(recurse=False)]
    return gm, model_inputs, tuple(dict.fromkeys(held + [name for name in used if name in tensors]))


def _as_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` holding exactly these parameters (meta or real), made without allocating others."""
    lin = nn.Linear(1, 1, bias=False, device="meta")
    lin.in_features, lin.out_features = int(weight.shape[1]), int(weight.shape[0])
    lin.weight = weight
    lin.bias = bias
    return lin


def _placeholder(graph: fx.Graph, name: str) -> fx.Node:
    """A placeholder the forward takes by keyword ``name`` (fx may rename the node, never its target)."""
    node = graph.placeholder(name)
    node.target = name
    return node


def _retarget(args: Any, old: torch.device | None, new: torch.device) -> Any:
    """``args`` with every device literal equal to ``old`` (any, when None) replaced by ``new``."""
    def swap(d: torch.device) -> torch.device:
        return new if old is None or d == old else d
    return pytree.tree_map_only(torch.device, swap, args)


def _register(root: nn.Module, name: str, value: Any) -> None:
    """Put ``value`` at dotted ``name`` under ``root``, creating the modules on the way."""
    *prefix, field = name.split(".")
    mod = root
    for part in prefix:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(field, value)
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(field, value)
    else:
        setattr(mod, field, value)


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding dotted ``name`` and the attribute's own name."""
    prefix, _, field = name.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), field


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owner, attribute, tensor, is_parameter) for every parameter and buffer under ``module``."""
    out = []
    for m in module.modules():
        out += [(m, k, v, True) for k, v in m._parameters.items() if v is not None]
        out += [(m, k, v, False) for k, v in m._buffers.items() if v is not None]
    return out


def _keep_output_structure(gm: fx.GraphModule, plan: _Plan) -> None:
    """Make the last stage return what the model returns (a tensor, a tuple, a dict, a ModelOutput)."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    in_spec = pytree.tree_structure(((), {n: 0 for n in names}))
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, plan.ep.call_spec.out_spec))
    gm.recompile()
