"""Capture a model's forward as an ATen FX graph with torch.export (non-strict)."""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from passes import graph as G
from passes.find import GraphContext, Match, find_matches
from passes.graph import WRAPPED

logger = logging.getLogger(__name__)

ROUTE = "torch.export.export(strict=False)"
BACKEND_ROUTE = 'torch.compile(model, backend="rewriter")'
VARARG = "input_"  # keyword name prefix of the positional arguments a forward(*args) receives


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message names the module/op and the route."""


@dataclass
class CallSpec:
    """How a caller's arguments map onto the captured program's keyword inputs."""

    names: list[str]  # forward's parameter names, in order (for binding positional arguments)
    captured: list[str]  # keyword names the program was captured with
    injected: dict[str, Any] = field(default_factory=dict)  # keywords we set for the user (use_cache=False)
    var_positional: bool = False

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Map a call's arguments to the captured keyword inputs, with a clear error on mismatch."""
        if len(args) > len(self.names):
            raise TypeError(f"expected at most {len(self.names)} positional arguments, got {len(args)}")
        bound = dict(zip(self.names, args))
        for k, v in kwargs.items():
            if k in bound:
                raise TypeError(f"got multiple values for argument {k!r}")
            bound[k] = v
        for k, v in self.injected.items():
            bound.setdefault(k, v)
        extra = set(bound) - set(self.captured)
        missing = set(self.captured) - set(bound)
        if extra or missing:
            raise TypeError(
                "the optimized model was captured with arguments "
                f"{sorted(self.captured)} but was called with {sorted(bound)}"
                + (f"; unexpected: {sorted(extra)}" if extra else "")
                + (f"; missing: {sorted(missing)}" if missing else "")
                + ". Re-run rewriter.optimize with example inputs that use the same arguments."
            )
        return {k: bound[k] for k in self.captured}

    def call(self, model: torch.nn.Module, kw: dict) -> Any:
        """Call the original ``model`` with bound keyword inputs, leading ones by position (input_0, ...
        of a varargs forward must be; the model's hooks expect them so)."""
        rest = dict(kw)
        args = []
        for n in self.names:
            if n not in rest:
                break
            args.append(rest.pop(n))
        return model(*args, **rest)

    def to_json(self) -> dict:
        """JSON-ready form (injected values must be JSON scalars)."""
        return {"names": self.names, "captured": self.captured, "injected": self.injected,
                "var_positional": self.var_positional}


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional arguments, or a dict of keyword arguments -> (args, kwargs)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def call_spec(model: torch.nn.Module, args: tuple, kwargs: dict) -> CallSpec:
    """Bind example arguments to forward's signature and add the keywords capture needs."""
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    injected: dict[str, Any] = {}
    # Hugging Face decoders return a cache object torch.export rejects; the user never needs it here.
    if "use_cache" in sig.parameters and "use_cache" not in kwargs:
        config = getattr(model, "config", None)
        if config is None or getattr(config, "use_cache", True) is not False:
            injected["use_cache"] = False
    if var_pos:
        # forward(*inputs): the program is captured through a wrapper whose keyword inputs are
        # input_0, input_1, ... so every entry point binds calls the same way.
        given = [k for k in kwargs if k.startswith(VARARG) and k[len(VARARG):].isdigit()]
        extra = max(len(args) - len(names), len(given))
        names = names + [f"{VARARG}{i}" for i in range(extra)]
    bound = dict(zip(names, args))
    captured = (list(bound) + [k for k in kwargs if k not in bound]
                + [k for k in injected if k not in bound and k not in kwargs])
    return CallSpec(names, captured, injected, var_positional=var_pos)


def capture(model: torch.nn.Module, example_inputs: Any) -> tuple[torch.export.ExportedProgram, CallSpec]:
    """Export ``model`` on ``example_inputs``; raises CaptureError naming what failed."""
    args, kwargs = split_inputs(example_inputs)
    spec = call_spec(model, args, kwargs)
    call_kwargs = spec.bind(args, kwargs)
    target: torch.nn.Module = model
    if _has_varargs(model):
        target = _VarargsCall(model, spec.names)
    elif _has_root_hooks(model):
        # The model's own hooks read positional arguments, as a user's call passes them.
        leading = []
        for n in spec.names:
            if n not in call_kwargs:
                break
            leading.append(n)
        target = _VarargsCall(model, leading)
    try:
        with torch.no_grad():
            ep = torch.export.export(target, (), call_kwargs, strict=False)
    except Exception as e:  # export raises many types; the user needs one clear message
        raise CaptureError(_explain(model, e)) from e
    return functional(ep), spec


def mutates(graph: fx.Graph) -> bool:
    """True when the graph holds an in-place op (add_, copy_ into a slice, dropout_, ...)."""
    return any(G.mutates(n) for n in graph.nodes)


def functional(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with its in-place ops replaced by their functional forms (slice writes become slice_scatter).

    Export's graph keeps the model's in-place ops, and a write into a view of the scores
    (``s[..., 1:, 1:] += bias``) is then invisible on the dataflow path from the product to the softmax.
    Functionalising makes every write a value the finder can follow. Graphs without in-place ops are
    returned as they are (the re-trace costs time on large models).
    """
    if not mutates(ep.graph):
        return ep
    try:
        with torch.no_grad():
            out = ep.run_decompositions({})
    except Exception as e:  # the finder refuses sites whose scores are written in place; nothing is lost
        logger.info("could not functionalise the captured graph (%s: %s); in-place writes stay as they are",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return ep
    # Functionalising spells each reshape as the view the traced strides allowed; a rewritten site hands
    # its consumer other strides, where that view would fail. In a graph without writes a view and a
    # reshape give the same values, so every view becomes a reshape again.
    for n in out.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
            n.target = torch.ops.aten.reshape.default
    out.graph_module.recompile()
    return out


def _has_varargs(model: torch.nn.Module) -> bool:
    return any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())


def _has_root_hooks(model: torch.nn.Module) -> bool:
    return bool(model._forward_pre_hooks or model._forward_hooks)


class _VarargsCall(torch.nn.Module):
    """Calls a model positionally from keyword inputs only (input_0, ... for ``forward(*args)``), so
    varargs forwards and the model's own hooks see the arguments as a user's call passes them."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        # Registered under the wrapper prefix graph.module_path strips, so site names stay the model's.
        setattr(self, WRAPPED, model)
        self.names = list(names)

    def forward(self, **kwargs: Any) -> Any:
        args = [kwargs.pop(n) for n in self.names if n in kwargs]
        return getattr(self, WRAPPED)(*args, **kwargs)


def _explain(model: torch.nn.Module, e: Exception) -> str:
    msg = str(e).strip().splitlines()
    first = next((line for line in msg if line.strip()), type(e).__name__)
    where = ""
    for line in msg:
        if "File " in line and ".py" in line and "torch/" not in line:
            where = line.strip()
    text = (
        f"could not capture {type(model).__name__} with {ROUTE}: {type(e).__name__}: {first}"
        + (f" (at {where})" if where else "")
        + f". The model runs unchanged; {BACKEND_ROUTE} can still serve it (graph breaks at what export "
        "rejects), or make its forward traceable (no data-dependent Python control flow on tensor values)."
    )
    return " ".join(text.split())  # one line, whatever the exception's own text held


def graph_context(ep: torch.export.ExportedProgram) -> GraphContext:
    """The finder's view of an exported program: which placeholders are user data, and constant values."""
    sig = ep.graph_signature
    user = set(sig.user_inputs)
    state = {**ep.state_dict, **ep.constants}
    lookup = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    constants: dict[str, torch.Tensor] = {}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        if n.name in lookup and lookup[n.name] in state:
            constants[n.name] = state[lookup[n.name]]
    user_nodes = {n for n in placeholders if n.name in user}
    return GraphContext(graph=ep.graph, user_inputs=user_nodes, constants=constants, shape_reads_are_lengths=True)


def fx_context(gm: fx.GraphModule, param_positions: set[int]) -> GraphContext:
    """The finder's view of a plain FX graph whose placeholders at ``param_positions`` are weights."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user = {n for i, n in enumerate(placeholders) if i not in param_positions}
    dynamic = any(
        isinstance(s, torch.SymInt) for n in placeholders
        for s in (getattr(n.meta.get("val"), "shape", ()) or ())
    )
    return GraphContext(graph=gm.graph, user_inputs=user, constants={}, dynamic=dynamic)


def analyse(model: torch.nn.Module, example_inputs: Any) -> tuple[torch.export.ExportedProgram, CallSpec,
                                                                  list[Match], list]:
    """Capture ``model`` and find its attention: (program, call spec, sites found, softmaxes that were not)."""
    t0 = time.perf_counter()
    logger.info("capturing %s with torch.export (non-strict)...", type(model).__name__)
    ep, spec = capture(model, example_inputs)
    logger.info("captured %d graph nodes in %.1fs; finding attention...", len(ep.graph.nodes), time.perf_counter() - t0)
    matches, rejected = find_matches(graph_context(ep))
    logger.info("found %d attention site(s) (%d softmaxes were not attention)", len(matches), len(rejected))
    return ep, spec, matches, rejected
