"""Walking an attention's scores: back from the softmax to the q·kᵀ product, forward to the value product.

The scores side collects, in forward order, the scale factors and the mask terms applied between the
product and the softmax; the probabilities side follows casts, views and (inactive) dropout to the
product with the values.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from passes import graph as G
from passes import masks
from passes.context import GraphContext, MaskTerm, NotAttention, Unsupported
from passes.operands import is_transpose_last2
from passes.site import as_int
from passes.writes import WRITES, region_write

logger = logging.getLogger(__name__)


def scalar_operand(ctx: GraphContext, node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """For mul/div of a tensor by a known scalar: (tensor, factor)."""
    name = G.opname(node)
    if name not in ("mul", "div"):
        return None
    a, b = node.args[0], node.args[1]
    sb = G.scalar_value(b, ctx.constants)
    if sb is not None and isinstance(a, fx.Node):
        if name == "div":
            return (a, 1.0 / sb) if sb != 0 else None
        return a, sb
    sa = G.scalar_value(a, ctx.constants)
    if name == "mul" and sa is not None and isinstance(b, fx.Node):
        return b, sa
    return None


PASS_THROUGH = G.VIEW_OPS | G.CAST_OPS


def _singleton_permute(node: fx.Node) -> bool:
    """A permute that only moves size-1 dims (decomposed einsums emit these): values keep their layout."""
    if G.opname(node) != "permute":
        return False
    s = G.shape(node.args[0])
    if s is None:
        return False
    big = [p for p in node.args[1] if s[p] != 1]
    return big == sorted(big)


def _score_root(ctx: GraphContext, x: Any, depth: int = 0) -> Optional[fx.Node]:
    """The contraction that produced scores ``x`` through scale/mask/modifier/view ops, or None."""
    if not isinstance(x, fx.Node) or depth > 40:
        return None
    name = G.opname(x)
    if name in G.CONTRACTION_OPS:
        return x
    if name in PASS_THROUGH or _singleton_permute(x) or is_transpose_last2(x) or name in WRITES | {"masked_fill"}:
        return _score_root(ctx, x.args[0], depth + 1)
    if name == "copy":  # a functional copy_: the values are its source's
        return _score_root(ctx, x.args[1], depth + 1)
    if name in ("mul", "div"):
        so = scalar_operand(ctx, x)
        if so:
            return _score_root(ctx, so[0], depth + 1)
    if name in ("add", "sub", "mul", "div"):
        roots = [r for r in (_score_root(ctx, a, depth + 1) for a in x.args[:2]) if r is not None]
        return roots[0] if len(roots) == 1 else None
    if name == "where":
        roots = [r for r in (_score_root(ctx, a, depth + 1) for a in x.args[1:3]) if r is not None]
        return roots[0] if len(roots) == 1 else None
    inner = _unary_input(x)
    return _score_root(ctx, inner, depth + 1) if inner is not None else None


# Ops that read only a tensor's shape, dtype and device, never its values (full_like(s, min)).
SHAPE_ONLY = frozenset({
    "full_like", "zeros_like", "ones_like", "empty_like", "new_full", "new_zeros", "new_ones", "new_empty",
    "sym_size", "sym_numel", "sym_stride",
})
# Shape-keeping ops that are not elementwise functions of their input's values.
_NOT_ELEMENTWISE = G.SOFTMAX_OPS | SHAPE_ONLY | frozenset({
    "cumsum", "cumprod", "sort", "flip", "roll", "amax", "amin", "sum", "mean", "rand_like", "randn_like",
    "log_softmax", "_log_softmax", "logcumsumexp",
})


def _unary_input(x: fx.Node) -> Optional[fx.Node]:
    """The only tensor input of an elementwise op that keeps its input's shape (tanh, clamp, ...), else None."""
    ins = [a for a in x.args if isinstance(a, fx.Node)]
    if x.op != "call_function" or len(ins) != 1 or x.kwargs.get("dim") is not None:
        return None
    s_in, s_out = G.shape(ins[0]), G.shape(x)
    if s_in is None or s_out is None or not G.same_sizes(s_in, s_out):
        return None
    if G.opname(x) in _NOT_ELEMENTWISE:
        return None
    return ins[0]


def _contracted_size(root: fx.Node) -> int:
    """Size of the dim a contraction reduces over (1 for an outer product)."""
    name = G.opname(root)
    a = root.args[1] if name in ("baddbmm", "einsum") else root.args[0]
    if name == "einsum":
        a = root.args[1][0]
    s = G.shape(a)
    return as_int(s[-1]) if s else -1


def _pick_scores(ctx: GraphContext, node: fx.Node, a: Any, b: Any) -> Optional[int]:
    """0 or 1: which of two operands carries the scores; -1 when both are functions of the same
    scores (x / (1 + |x|)); None when neither or it cannot be told."""
    ra, rb = _score_root(ctx, a), _score_root(ctx, b)
    if (ra is None) != (rb is None):
        return 0 if ra is not None else 1
    if ra is None:
        return None
    if ra is rb:
        return -1
    # A mask can itself come from a product (an outer product of padding vectors): the scores are
    # the side whose product contracts a real head dim and whose shape is the result's own.
    full = G.shape(node)
    score_like = [
        _contracted_size(r) > 1 and G.same_sizes(G.shape(x) or (), full or ())
        for r, x in ((ra, a), (rb, b))
    ]
    if score_like.count(True) == 1:
        return score_like.index(True)
    return None


def _fill_value(ctx: GraphContext, x: Any) -> tuple[float, str]:
    """(value, problem) of a mask's fill; problem is "" when the value is known."""
    v = G.scalar_value(x, ctx.constants)
    if v is not None:
        return v, ""
    if isinstance(x, fx.Node):
        name = G.opname(x)
        if name in ("full_like", "new_full", "full"):  # a constant whatever the shape it borrows
            v = G.scalar_value(G.arg(x, 1, "fill_value"), ctx.constants)
            if v is not None:
                return v, ""
        if x not in ctx.activations:
            t = masks.evaluate(ctx, x)
            if t is not None and t.numel() >= 1:
                flat = t.reshape(-1)
                if bool((flat == flat[0]).all()):
                    return float(flat[0]), ""
    return -math.inf, f"mask fill value {getattr(x, 'name', x)!r} is not a known constant"


def walk_scores(ctx: GraphContext, x: fx.Node) -> tuple[fx.Node, list, list[fx.Node]]:
    """Walk back from the softmax input to the scores contraction.

    Returns (contraction, ops in forward order, chain nodes). ops are ("scale", s), ("tanh",),
    ("transpose",) (the last two dims swap), ("tscale", tensor, "mul" | "div", layout) (a tensor-valued
    scale), ("unsupported", reason) or MaskTerm.
    """
    ops: list = []
    chain: list[fx.Node] = []
    while True:
        name = G.opname(x)
        if name in G.CONTRACTION_OPS:
            if name == "baddbmm":
                beta = G.arg(x, 3, "beta", 1)
                alpha = G.arg(x, 4, "alpha", 1)
                # beta*bias + alpha*(q@kT) == (q@kT + bias*beta/alpha) * alpha; ops are collected backwards.
                ops.append(("scale", float(alpha)))
                if float(beta) != 0.0:
                    ops.append(MaskTerm("add", x.args[0], factor=float(beta) / float(alpha), layout=G.shape(x)))
            ops.reverse()
            return x, ops, chain
        chain.append(x)
        if name in PASS_THROUGH or _singleton_permute(x):
            x = x.args[0]
            continue
        if is_transpose_last2(x):
            ops.append(("transpose",))
            x = x.args[0]
            continue
        if name in WRITES:
            x, op = region_write(ctx, x)
            if op is not None:
                ops.append(op)
            continue
        if name == "copy" and G.same_sizes(G.shape(x.args[1]) or (), G.shape(x) or (None,)):
            x = x.args[1]  # copy(dst, src) of the whole tensor: src's values (cast to dst's dtype)
            continue
        if G.mutates(x):
            raise Unsupported(f"{name} writes into the scores in place (the graph is not functional)")
        if name in ("mul", "div"):
            so = scalar_operand(ctx, x)
            if so is not None:
                ops.append(("scale", so[1]))
                x = so[0]
                continue
        if name in ("add", "sub"):
            a, b = x.args[0], x.args[1]
            alpha = x.kwargs.get("alpha", 1)
            side = _pick_scores(ctx, x, a, b)
            if side is None:
                raise NotAttention(f"cannot tell scores from bias at {x.name}")
            if side == -1:
                ops.append(("unsupported", f"{name} of two functions of the scores ({x.name}) before the softmax; "
                                           "rewriter::attention cannot express it"))
                x = a
                continue
            if side == 0:
                sign = -1.0 if name == "sub" else 1.0
                if isinstance(b, fx.Node):
                    ops.append(MaskTerm("add", b, factor=sign * float(alpha), layout=G.shape(x)))
                elif b != 0:
                    ops.append(("unsupported", f"a constant {b!r} is added to the scores"))
                x = a
            else:
                if name == "sub" or float(alpha) != 1.0:
                    ops.append(("unsupported", f"scores are subtracted or scaled inside {x.name}"))
                if isinstance(a, fx.Node):
                    ops.append(MaskTerm("add", a, layout=G.shape(x)))
                x = b
            continue
        if name in ("mul", "div"):
            side = _pick_scores(ctx, x, x.args[0], x.args[1])
            if side is None or (name == "div" and side == 1):
                raise NotAttention(f"scores multiplied by a tensor ({x.name})")
            if side == -1:
                ops.append(("unsupported", f"{name} of two functions of the scores ({x.name}) before the softmax; "
                                           "rewriter::attention cannot express it"))
                x = x.args[0]
                continue
            t = x.args[1 - side]
            problem = _tensor_scale_problem(t, x)
            ops.append(("unsupported", problem) if problem else ("tscale", t, name, G.shape(x)))
            x = x.args[side]
            continue
        if name == "masked_fill":
            fill, problem = _fill_value(ctx, x.args[2])
            if problem:
                ops.append(("unsupported", problem))
            ops.append(MaskTerm("drop", x.args[1], fill=fill, layout=G.shape(x)))
            x = x.args[0]
            continue
        if name == "where":
            cond, a, b = x.args[0], x.args[1], x.args[2]
            side = _pick_scores(ctx, x, a, b)
            if side is None or side == -1:
                raise NotAttention(f"cannot tell scores from fill at {x.name}")
            fill, problem = _fill_value(ctx, b if side == 0 else a)
            if problem:
                ops.append(("unsupported", problem))
            ops.append(MaskTerm("keep" if side == 0 else "drop", cond, fill=fill, layout=G.shape(x)))
            x = a if side == 0 else b
            continue
        if name == "tanh":
            ops.append(("tanh",))
            x = x.args[0]
            continue
        inner = _unary_input(x)
        if inner is not None and _score_root(ctx, inner) is not None:
            ops.append(("unsupported", f"{name or x.op} modifies the scores before the softmax; "
                                       "rewriter::attention cannot express it"))
            x = inner
            continue
        raise NotAttention(f"{name or x.op} between scores and softmax")


def _tensor_scale_problem(t: Any, out: fx.Node) -> str:
    """Why scores times tensor ``t`` cannot be folded into q ("" when it can: constant along the keys)."""
    st, so = G.shape(t), G.shape(out)
    where = f"the scores are multiplied by a tensor at {out.name}"
    if st is None or so is None:
        return f"{where} of unknown shape"
    if not G.dtype(t) or not G.dtype(t).is_floating_point:
        return f"{where} that is not floating point"
    if len(st) > len(so) or any(not (as_int(a) == 1 or G.same_sizes((a,), (b,))) for a, b in zip(st[::-1], so[::-1])):
        return f"{where} that widens them"
    if st and as_int(st[-1]) != 1:
        return f"{where} that varies along the keys (a per-element scale)"
    return ""


def fold_ops(ops: list, swapped: bool = False) -> tuple[float, float, list[MaskTerm], list[str], list]:
    """(scale, softcap, masks, problems, tensor scales) from the scores ops in forward order.

    ``a * tanh(b * s)`` equals the op's ``c * tanh(s' / c)`` with c = |a| and s' = a·b·s, so any
    scalar placement around the tanh is one soft-cap; masks must come after it (the op caps first).
    ``swapped``: the product's output is laid out [.., keys, queries] (each transpose flips it); a mask
    or tensor scale applied in that layout is not carried.
    """
    scale, post, softcap = 1.0, 1.0, 0.0
    masks: list[MaskTerm] = []
    problems: list[str] = []
    tscales: list = []
    capped = False
    for op in ops:
        if isinstance(op, MaskTerm):
            if swapped:
                problems.append("a mask or bias is applied to the transposed scores")
            masks.append(dataclasses.replace(op))  # a copy: the factors below are folded into it, not into ops
        elif op[0] == "unsupported":
            problems.append(op[1])
        elif op[0] == "transpose":
            swapped = not swapped
        elif op[0] == "tscale":
            if swapped:
                problems.append("a tensor-valued scale is applied to the transposed scores")
            elif masks:
                problems.append("a mask or bias is applied before a tensor-valued scale of the scores")
            elif capped:
                problems.append("a tensor-valued scale follows the soft-cap (tanh): a per-head cap")
            else:
                tscales.append(op[1:])
        elif op[0] == "tanh":
            if capped:
                problems.append("the scores pass through tanh twice")
            if masks:
                problems.append("a mask or bias is applied before the soft-cap (tanh); rewriter::attention "
                                "caps the scores first")
            capped = True
        else:
            s = op[1]
            if capped:
                post *= s
            else:
                scale *= s
            for m in masks:
                if m.kind == "add":
                    m.factor *= s
                else:
                    m.fill *= s
    if capped:
        if post == 0:
            problems.append("the soft-capped scores are multiplied by zero")
        softcap, scale = abs(post), scale * post
    return scale, softcap, masks, problems, tscales


def softmax_input(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(input, dim) if ``node`` computes a softmax: an ATen softmax op or its exp / sum decomposition."""
    name = G.opname(node)
    if name in G.SOFTMAX_OPS:
        return node.args[0], G.arg(node, 1, "dim")
    if name != "div" or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    e, total = node.args[0], node.args[1]
    if G.opname(e) != "exp" or G.opname(total) != "sum" or total.args[0] is not e:
        return None
    sub = e.args[0]
    if G.opname(sub) != "sub" or not isinstance(sub.args[1], fx.Node) or G.opname(sub.args[1]) != "amax":
        return None
    x, amax = sub.args[0], sub.args[1]
    if amax.args[0] is not x:
        return None
    dims = list(G.arg(total, 1, "dim", [])) or [None]
    if len(dims) != 1 or list(G.arg(amax, 1, "dim", [])) != dims:
        return None
    return x, dims[0]


def _net_layout(start: fx.Node, chain: list[fx.Node]) -> Optional[bool]:
    """Replay a chain of view/permute ops on an index tensor: False if the values keep their order, True if
    the last two dims end up swapped, None for anything else (or when it cannot be replayed)."""
    s = G.shape(start)
    try:
        with unset_fake_temporarily():  # inside a compiler a fake mode is active; replay for real
            return _replay(s, chain)
    except Exception:  # symbolic sizes (a data-dependent length) or an op we cannot replay
        return _symbolic_layout(s, chain)


_BATCH_VIEWS = G.VIEW_OPS | {"expand"}


def _symbolic_layout(s: Optional[tuple], chain: list[fx.Node]) -> Optional[bool]:
    """The same answer as ``_net_layout`` from the ops' arguments alone (no sizes to replay with): permutes
    are composed; a view may only regroup the leading dims, in order, while the last two stay in place."""
    if s is None or len(s) < 2:
        return None
    dims: list = [*range(len(s) - 2), "P", "M"]  # what each dim of the current tensor is
    for n in chain:
        name, nd = G.opname(n), len(dims)
        if name in G.CAST_OPS | G.DROPOUT_OPS:
            continue
        if name == "permute":
            dims = [dims[d % nd] for d in n.args[1]]
        elif name == "transpose":
            a, b = G.arg(n, 1, "dim0") % nd, G.arg(n, 2, "dim1") % nd
            dims[a], dims[b] = dims[b], dims[a]
        elif name == "t" and nd == 2:
            dims = dims[::-1]
        elif name in _BATCH_VIEWS:
            si, so = G.shape(n.args[0]), G.shape(n)
            lead = dims[:-2]
            if (si is None or so is None or len(so) < 2 or set(dims[-2:]) != {"P", "M"}
                    or lead != sorted(lead) or not G.same_sizes(si[-2:], so[-2:])):
                return None
            dims = [*range(len(so) - 2), *dims[-2:]]
        else:
            return None
    lead = dims[:-2]
    if any(isinstance(d, str) for d in lead) or lead != sorted(lead):
        return None
    return {("P", "M"): False, ("M", "P"): True}.get(tuple(dims[-2:]))


def _replay(s: tuple, chain: list[fx.Node]) -> Optional[bool]:
    x = torch.arange(int(G.prod(s))).reshape([int(d) for d in s])
    want = x
    for n in chain:
        if G.opname(n) in G.CAST_OPS | G.DROPOUT_OPS:
            continue
        x = n.target(x, *n.args[1:], **{k: v for k, v in n.kwargs.items() if k != "memory_format"})
    flat = x.reshape(-1)  # batch dims may be flattened on the way ([B, H] -> [B*H] for bmm)
    if torch.equal(flat, want.reshape(-1)) and tuple(x.shape[-2:]) == tuple(want.shape[-2:]):
        return False
    swapped = want.transpose(-1, -2)
    if torch.equal(flat, swapped.reshape(-1)) and tuple(x.shape[-2:]) == tuple(swapped.shape[-2:]):
        return True
    return None


_LAYOUT_OPS = frozenset({"permute", "transpose", "t"})


class Probs(NamedTuple):
    """The probabilities side of an attention, from the softmax to the product with the values."""

    c2: Optional[fx.Node]  # the values contraction (None when the softmax is not followed by one)
    probs: Optional[fx.Node]  # its probabilities operand
    chain: list  # nodes between the softmax and the product
    notes: list  # facts worth reporting
    swapped: bool  # the probabilities reach the product with their last two dims transposed (v.mT @ p.mT)
    problems: list  # reasons the site cannot be rewritten (active dropout)


def walk_probs(ctx: GraphContext, sm: fx.Node) -> Probs:
    """Follow the softmax forward to the values contraction."""
    chain: list[fx.Node] = []
    notes: list[str] = []
    problems: list[str] = []
    x = sm
    while True:
        us = [u for u in G.users(x) if u in ctx.live]  # a dead clone kept "for inspection" is no use
        nxt = [u for u in us if G.opname(u) in (G.CONTRACTION_OPS - {"baddbmm"})]
        if len(nxt) != 1:
            nxt = [u for u in us if G.opname(u) in (PASS_THROUGH | G.DROPOUT_OPS | _LAYOUT_OPS)]
        if len(us) > 1:
            notes.append("the attention probabilities are also used elsewhere (returned weights?); "
                         "they are still computed")
        if len(nxt) != 1:
            return Probs(None, None, chain, notes, False, problems)
        u = nxt[0]
        name = G.opname(u)
        if name in G.CONTRACTION_OPS and name not in ("baddbmm",):
            swapped = False
            if any(G.opname(n) in _LAYOUT_OPS for n in chain):
                got = _net_layout(sm, chain)
                if got is None:
                    raise Unsupported("the probabilities are permuted before the value product")
                swapped = got
            return Probs(u, x, chain, notes, swapped, problems)
        if name == "native_dropout":
            raise Unsupported("native_dropout on the probabilities (model in training mode)")
        if name in G.DROPOUT_OPS:
            p = float(G.arg(u, 1, "p", 0.0))
            train = G.arg(u, 2, "train", True)
            if p > 0 and train:
                problems.append("dropout on the attention probabilities is active (model in training mode)")
        chain.append(u)
        x = u
