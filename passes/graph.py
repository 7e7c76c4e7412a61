"""Small helpers over ATen FX graphs: op names, shapes, constants and dataflow queries."""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable, Optional, Sequence

import networkx as nx
import torch
import torch.fx as fx

# Ops that change only the view of a tensor, never its values.
VIEW_OPS = frozenset(
    {
        "view", "reshape", "_unsafe_view", "expand", "clone", "contiguous", "alias", "detach",
        "unsqueeze", "squeeze", "lift_fresh_copy", "_reshape_alias", "flatten", "unflatten",
    }
)
# Ops that change only the dtype (softmax in float32 then cast back, type_as, .float()).
CAST_OPS = frozenset({"_to_copy", "to", "type_as", "_assert_tensor_metadata"})
SOFTMAX_OPS = frozenset({"softmax", "_softmax", "_safe_softmax"})
CONTRACTION_OPS = frozenset({"matmul", "bmm", "mm", "einsum", "baddbmm"})
SDPA_OPS = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    }
)
# In-place forms included: in eval mode they return their input unchanged, as the functional ones do.
DROPOUT_OPS = frozenset({"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "dropout_",
                         "feature_dropout_", "alpha_dropout_"})
def op_names(*ops: Any) -> frozenset[str]:
    """The names ``opname`` gives the nodes of these ATen ops (``aten.linear`` -> ``linear``)."""
    return frozenset(op._qualified_op_name.split("::")[-1] for op in ops)


_aten = torch.ops.aten
LINEAR_OPS = op_names(_aten.linear)
PROJECTION_OPS = LINEAR_OPS | frozenset({"addmm", "mm", "matmul", "bmm", "baddbmm", "einsum", "conv1d", "conv2d"})


def opname(node: fx.Node) -> str:
    """The ATen op name of a call_function node without namespace or overload ("view"), else ''."""
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::", 1)[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::", 1)[-1]
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", "")


def val(node: Any) -> Any:
    """The example value (usually a FakeTensor) recorded on a node, or None."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return None


def shape(node: Any) -> Optional[tuple]:
    """Shape of a tensor-valued node, or None when unknown."""
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: Any) -> Optional[torch.dtype]:
    """Dtype of a tensor-valued node, or None when unknown."""
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def prod(xs: Iterable) -> Any:
    """Product of sizes (works on SymInts)."""
    out = 1
    for x in xs:
        out = out * x
    return out


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, whether passed positionally or as keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def scalar_value(x: Any, constants: dict[str, torch.Tensor]) -> Optional[float]:
    """A Python number for ``x`` if it is a number or a known 0-d tensor constant, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node):
        t = constants.get(x.name)
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.device.type != "meta":
            return float(t.reshape(()))
        name = opname(x)
        if name == "scalar_tensor":
            return scalar_value(x.args[0], constants)
        if name == "full" and list(x.args[0]) == []:
            return scalar_value(x.args[1], constants)
        if name in ("sqrt",):
            inner = scalar_value(x.args[0], constants)
            return math.sqrt(inner) if inner is not None and inner >= 0 else None
        if name in CAST_OPS | {"lift_fresh_copy", "clone", "detach"}:
            return scalar_value(x.args[0], constants)
    return None


def to_digraph(graph: fx.Graph) -> nx.DiGraph:
    """The FX graph's dataflow as a networkx DiGraph of node objects (edges producer -> user)."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


# Ops that read a tensor's shape, not its values: what is computed from them alone (a mask built from
# arange of the runtime length) is a function of the length, as it would be a constant in a static capture.
SHAPE_READS = frozenset({"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"})


def depends_on(dg: nx.DiGraph, sources: Iterable[fx.Node], stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """All nodes whose value depends on any of ``sources`` (sources included), not looking past ``stop``."""
    stop = set(stop)
    out: set[fx.Node] = set()
    stack = [s for s in sources if s in dg]
    while stack:
        n = stack.pop()
        if n in out or n in stop:
            continue
        out.add(n)
        stack.extend(dg.successors(n))
    return out


# Attribute under which capture wraps a model it cannot call by keywords (forward(*args)); not part of
# any site's module path.
WRAPPED = "rewriter_wrapped"

_PATH_BRACKET = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced ``node`` (e.g. 'layers.0.self_attn')."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo spells paths as L['self'].layers[0].attn or L__self___layers_0; normalise them.
    path = path.replace("L['self']", "").replace("L__self__", "")
    path = _PATH_BRACKET.sub(lambda m: "." + m.group(1), path)
    path = re.sub(r"\._modules\.|\.modules\.", ".", path)
    path = path.strip(".")
    if path == WRAPPED or path.startswith(WRAPPED + "."):
        path = path[len(WRAPPED) + 1:]
    return path


def users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that do real work (runtime metadata asserts are ignored)."""
    return [u for u in node.users if opname(u) != "_assert_tensor_metadata"]


def mutates(node: fx.Node) -> bool:
    """True for a call of an in-place ATen op (add_, copy_, masked_fill_, dropout_, ...)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


# Ops whose result may share memory with their first argument (a write into it changes the input).
ALIAS_OPS = VIEW_OPS - {"clone", "contiguous", "lift_fresh_copy"} | frozenset({
    "slice", "select", "transpose", "permute", "t", "narrow", "diagonal", "as_strided", "unfold", "split",
    "chunk", "unbind", "split_with_sizes", "getitem", "view_as", "expand_as", "movedim", "swapaxes",
})


def written_in_place(graph: fx.Graph) -> set:
    """Nodes an in-place op writes into, directly or through a chain of views, and every view between."""
    out: set = set()
    for n in graph.nodes:
        if not mutates(n):
            continue
        schema = n.target._schema
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write or i >= len(n.args):
                continue
            x = n.args[i]
            while isinstance(x, fx.Node) and x not in out:
                out.add(x)
                # an in-place op returns its input: writing into its result writes into that input
                x = x.args[0] if (opname(x) in ALIAS_OPS or mutates(x)) and x.args else None
    return out


def same_sizes(a: Sequence, b: Sequence) -> bool:
    """Shape equality that tolerates SymInts."""
    if len(a) != len(b):
        return False
    try:
        return all(bool(x == y) for x, y in zip(a, b))
    except Exception:  # unbacked symbols cannot be decided
        return False
