"""Writes into a region of the scores, as a functional graph spells them, turned into mask terms.

``s[..., 1:, 1:] += bias`` is ``slice_scatter(s, slice(s) + bias)`` once the graph is functional;
``s[..., :, n:] = -inf`` is ``slice_scatter(s, fill(slice(s), -inf))``; ``s[mask] = -inf`` is
``index_put(s, [mask], -inf)``. Each equals the scores plus a bias that is zero outside the region,
or the scores with the region hidden, so the finder carries it as an additive or a keep/drop mask
term. The term's tensor is built once from the write itself (zeros or ones with the region written),
so it is a function of shapes and the written values only, never of the scores.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
import torch.fx as fx

from passes import graph as G
from passes.context import GraphContext, MaskTerm
from passes.emit import Emitter

logger = logging.getLogger(__name__)
aten = torch.ops.aten

SCATTERS = frozenset({"slice_scatter", "select_scatter"})
WRITES = SCATTERS | {"index_put"}
_VIEW_OF = {"slice_scatter": "slice", "select_scatter": "select"}
_HUGE = 2 ** 62  # an end past any size ("to the end" is spelled as int64 max)


def _norm(kind: str, size: Any, args: tuple) -> tuple:
    """A slice's (dim, start, end, step) or a select's (dim, index) with defaults filled and ends clamped,
    so two spellings of one region compare equal."""
    if kind == "select":
        dim, index = args[0], args[1]
        if isinstance(index, int) and isinstance(size, int) and index < 0:
            index += size
        return (dim, index)
    dim, start, end, step = (list(args) + [0, None, None, 1][len(args):])[:4]
    start = 0 if start is None else start
    end = _HUGE if end is None else end
    if isinstance(size, int):
        if isinstance(start, int):
            start = min(max(start + size if start < 0 else start, 0), size)
        if isinstance(end, int):
            end = min(max(end + size if end < 0 else end, 0), size)
    return (dim, start, end, step)


def _same(a: tuple, b: tuple) -> bool:
    try:
        return len(a) == len(b) and all(bool(x == y) for x, y in zip(a, b))
    except Exception:  # undecidable symbolic sizes: not provably the same region
        return False


def _step_of(kind: str, node: fx.Node, base: Any, rest: tuple) -> Optional[tuple]:
    """(kind, normalised params) of one level of a write or view of ``base``, or None for a bad dim."""
    s = G.shape(base)
    if s is None or not rest:
        return None
    dim = rest[0]
    if not isinstance(dim, int):
        return None
    dim %= len(s)
    return kind, _norm(kind, s[dim], (dim, *rest[1:]))


def _view_step(x: Any) -> Optional[tuple[fx.Node, tuple]]:
    """(base, step) when ``x`` is slice/select of a tensor."""
    if not isinstance(x, fx.Node) or G.opname(x) not in ("slice", "select"):
        return None
    st = _step_of(G.opname(x), x, x.args[0], tuple(x.args[1:]) or (x.kwargs.get("dim", 0),))
    return (x.args[0], st) if st is not None else None


# Ops that give the same values for the same input and arguments (a functional graph spells one view
# again for every read of it: reshape(s, shape) twice is one tensor).
_PURE_VIEWS = frozenset({"reshape", "view", "_unsafe_view", "alias", "expand", "permute", "transpose", "t",
                         "unsqueeze", "squeeze", "slice", "select", "clone", "contiguous"})


def _same_value(a: Any, b: Any, depth: int = 0) -> bool:
    """True when ``a`` and ``b`` are one tensor: the same node, or the same view of the same tensor."""
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or depth > 12:
        return False
    name = G.opname(a)
    if name not in _PURE_VIEWS or G.opname(b) != name or len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    if not _same_value(a.args[0], b.args[0], depth + 1):
        return False
    return all(_same_arg(x, y) for x, y in zip(a.args[1:], b.args[1:]))


def _same_arg(x: Any, y: Any) -> bool:
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_arg(a, b) for a, b in zip(x, y))
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return x is y
    return _same((x,), (y,))


def _is_region(x: Any, base: fx.Node, path: list) -> bool:
    """True when ``x`` is ``base`` viewed through exactly the slices/selects of ``path``."""
    for st in reversed(path):
        got = _view_step(x)
        if got is None or got[1][0] != st[0] or not _same(got[1][1], st[1]):
            return False
        x = got[0]
    return _same_value(x, base)


def _parse(node: fx.Node) -> tuple[fx.Node, list, Any]:
    """A (possibly nested) slice/select scatter as (base, path of view steps, value written there)."""
    kind = _VIEW_OF[G.opname(node)]
    base, src = node.args[0], node.args[1]
    st = _step_of(kind, node, base, tuple(node.args[2:]) or (0,))
    if st is None:
        return base, [], None
    path = [st]
    if isinstance(src, fx.Node) and G.opname(src) in SCATTERS and _is_region(src.args[0], base, path):
        _, inner, value = _parse(src)
        return base, path + inner, value if inner else None
    return base, path, src


def _unwrap_copy(v: Any) -> Any:
    """copy(dst, src) writes src's values (broadcast, cast) into dst's shape: the value is src's."""
    while isinstance(v, fx.Node) and G.opname(v) == "copy":
        v = v.args[1]
    return v


def _build(ctx: GraphContext, at: fx.Node, base: fx.Node, path: list, dtype: torch.dtype, outside: float,
           inside) -> fx.Node:
    """A tensor shaped like ``base``, ``outside`` everywhere and ``inside(region view)`` in the region."""
    em = Emitter(ctx.graph, at)
    device = G.val(base).device
    views = [em(aten.full.default, em.exact_sizes(list(G.shape(base))), outside, dtype=dtype, device=device)]
    for kind, p in path:
        views.append(em(aten.slice.Tensor if kind == "slice" else aten.select.int, views[-1], *p))
    inner = inside(em, views[-1])
    for (kind, p), v_base in zip(reversed(path), reversed(views[:-1])):
        inner = em(aten.slice_scatter.default if kind == "slice" else aten.select_scatter.default, v_base, inner, *p)
    return inner


def region_write(ctx: GraphContext, node: fx.Node) -> tuple[fx.Node, Any]:
    """For a write into the scores: (the scores before it, what it amounts to).

    What it amounts to is None (the write keeps every value: a copy of the region into itself),
    a MaskTerm, or ("unsupported", reason).
    """
    name = G.opname(node)
    layout = G.shape(node)
    if name == "index_put":
        return node.args[0], _index_put(ctx, node, layout)
    cached = ctx.derived.get(node)
    if cached is not None:
        return cached
    base, path, value = _parse(node)
    out = (base, _classify(ctx, node, base, path, value, layout))
    ctx.derived[node] = out
    return out


def _classify(ctx: GraphContext, node: fx.Node, base: fx.Node, path: list, value: Any, layout) -> Any:
    where = f"a write into a region of the scores ({node.name})"
    if value is None or G.shape(base) is None or G.val(base) is None:
        return ("unsupported", f"{where} could not be read")
    value = _unwrap_copy(value)
    if _is_region(value, base, path):
        return None  # the region written back into itself (what ``s[r] += b`` leaves after its own add)
    dt = G.dtype(base)
    name = G.opname(value) if isinstance(value, fx.Node) else ""
    if name in ("add", "sub") and isinstance(value, fx.Node):
        a, b = value.args[0], value.args[1]
        alpha = float(value.kwargs.get("alpha", 1))
        if _is_region(a, base, path) and not _is_region(b, base, path):
            sign = -alpha if name == "sub" else alpha
            bias = b
        elif name == "add" and _is_region(b, base, path) and not _is_region(a, base, path) and alpha == 1.0:
            sign, bias = 1.0, a
        else:
            return ("unsupported", f"{where} combines the scores with themselves")
        if not isinstance(bias, fx.Node):
            return ("unsupported", f"{where} adds a constant {bias!r}") if bias != 0 else None

        def add_bias(em: Emitter, region: fx.Node) -> fx.Node:
            t = bias if sign == 1.0 else em(aten.mul.Tensor, bias, sign)
            return em.steps(em(aten.add.Tensor, region, t), [("to", dt)])

        term = _build(ctx, node, base, path, dt, 0.0, add_bias)
        ctx.refresh()
        return MaskTerm("add", term, layout=layout)
    fill = _constant(ctx, value)
    if fill is None:
        return ("unsupported", f"{where} overwrites scores with values that are neither a bias nor a constant")

    def hide(em: Emitter, region: fx.Node) -> fx.Node:
        # a factory, not zeros_like: the backend's graphs are already decomposed for Inductor
        return em(aten.full.default, em.exact_sizes(list(G.shape(region))), False, dtype=torch.bool,
                  device=G.val(region).device)

    keep = _build(ctx, node, base, path, torch.bool, True, hide)
    ctx.refresh()
    return MaskTerm("keep", keep, fill=fill, layout=layout)


def _constant(ctx: GraphContext, value: Any) -> Optional[float]:
    """The constant a region is filled with (fill, full_like, a 0-d constant), or None."""
    v = G.scalar_value(value, ctx.constants)
    if v is not None:
        return v
    if isinstance(value, fx.Node) and G.opname(value) in ("fill", "full_like", "new_full"):
        return G.scalar_value(value.args[1], ctx.constants)
    if isinstance(value, fx.Node) and G.opname(value) in ("full", "expand"):
        return G.scalar_value(value.args[1] if G.opname(value) == "full" else value.args[0], ctx.constants)
    return None


def _index_put(ctx: GraphContext, node: fx.Node, layout) -> Any:
    """``s[mask] = c`` with a bool mask the scores' shape: the scores with the mask's positions filled by c."""
    where = f"an indexed write into the scores ({node.name})"
    indices, value = node.args[1], node.args[2]
    accumulate = G.arg(node, 3, "accumulate", False)
    idx = [i for i in indices if i is not None] if isinstance(indices, (list, tuple)) else []
    if accumulate or len(idx) != 1 or len(indices) != 1 or G.dtype(idx[0]) != torch.bool:
        return ("unsupported", f"{where} is not a boolean mask filled with a constant")
    if not G.same_sizes(G.shape(idx[0]) or (), G.shape(node.args[0]) or (None,)):
        return ("unsupported", f"{where} uses a mask of another shape than the scores")
    fill = _constant(ctx, value)
    if fill is None or math.isnan(fill):
        return ("unsupported", f"{where} writes values that are not a constant")
    return MaskTerm("drop", idx[0], fill=fill, layout=layout)
