"""Find the image token grid of a site from the graph's dataflow, by following patch positions forward.

A vision transformer makes its tokens from a 4-D spatial tensor ``[B, C, rows, cols]``: the output of a
strided convolution (the patch embedding), or of a resampling of it (interpolate, pooling). The tokens are
that grid flattened row-major, usually with class or register tokens joined before (or after) them, and
often with a position embedding added before or after the join, in NCHW or NHWC layout.

Rather than matching those spellings, each candidate grid source is given an index tensor (every element
holds its patch's row-major position) and the index is carried forward through the ops between the source
and the site's queries: views and permutes are replayed, joins add -1 for tokens from elsewhere,
element-wise ops keep it, ops that mix the channel dim keep a row's position when the whole row shares one.
The first tensor on the way to the queries whose sequence is the site's length and reads
[-1] * prefix + 0..rows*cols-1 + [-1] * suffix is the token sequence. Anything the walk cannot follow
stops it, so a grid is only reported where the positions are proven.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx

from passes import graph as G

logger = logging.getLogger(__name__)

_SOURCES = frozenset({
    "conv2d", "convolution", "_convolution", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_nearest2d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "_upsample_nearest_exact2d", "avg_pool2d", "max_pool2d",
    "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "interpolate",
})
# Ops that move or copy values without computing: replayed on the index tensor.
_REPLAY = frozenset({
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute", "transpose", "t", "clone", "contiguous",
    "alias", "unsqueeze", "squeeze", "expand", "slice", "select", "split", "chunk", "unbind", "split_with_sizes",
    "detach", "lift_fresh_copy", "movedim",
})
_SAME = G.CAST_OPS | frozenset({  # element-wise: each output element comes from the same position
    "add", "sub", "mul", "div", "neg", "gelu", "relu", "silu", "sigmoid", "tanh", "dropout", "clamp", "pow",
    "exp", "sqrt", "rsqrt", "where", "masked_fill", "erf", "abs", "hardtanh", "leaky_relu", "alias",
})
_MIX_LAST = G.LINEAR_OPS | frozenset({"layer_norm", "rms_norm", "native_layer_norm", "addmm", "mm", "matmul"})
_MIXED = -2  # an element whose value comes from more than one patch position


@dataclass(frozen=True)
class TokenGrid:
    """Patch tokens form a rows x cols grid after ``prefix`` global tokens (and ``suffix`` after it)."""

    rows: int
    cols: int
    prefix: int
    suffix: int = 0


def _ints(shape: Any) -> Optional[tuple]:
    try:
        return tuple(int(s) for s in shape)
    except Exception:  # symbolic sizes: nothing to replay
        return None


def _combine(parts: list[torch.Tensor], shape: tuple) -> torch.Tensor:
    """Element-wise agreement of several index tensors broadcast to ``shape`` (_MIXED where they differ)."""
    out = parts[0].expand(shape)
    for p in parts[1:]:
        p = p.expand(shape)
        out = torch.where(out == p, out, torch.full_like(out, _MIXED))
    return out


def _mix_last(x: torch.Tensor, shape: tuple) -> Optional[torch.Tensor]:
    """An op that mixes the last dim: each row keeps its position if the whole row had one."""
    if x.dim() != len(shape) or tuple(x.shape[:-1]) != tuple(shape[:-1]):
        return None
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    return torch.where(lo == hi, lo, torch.full_like(lo, _MIXED)).expand(shape)


def _step(n: fx.Node, idx: dict) -> Any:
    """The index of node ``n`` from the indices of its inputs, or None when it cannot be followed."""
    name = G.opname(n)
    shape = _ints(G.shape(n) or ()) if isinstance(G.val(n), torch.Tensor) else None
    if name == "getitem":
        src = idx.get(n.args[0])
        return src[n.args[1]] if isinstance(src, (tuple, list)) and n.args[1] < len(src) else None
    first = n.args[0] if n.args else None
    if name in _REPLAY:
        x = idx.get(first)
        if not isinstance(x, torch.Tensor) or any(isinstance(a, fx.Node) for a in n.args[1:]):
            return None
        out = n.target(x, *n.args[1:], **{k: v for k, v in n.kwargs.items() if k != "memory_format"})
        return tuple(out) if isinstance(out, (tuple, list)) else out
    if name == "cat":
        parts = list(first)
        dim = G.arg(n, 1, "dim", 0)
        got = []
        for p in parts:
            s = _ints(G.shape(p) or ())
            got.append(idx[p] if p in idx else (torch.full(s, -1, dtype=torch.long) if s is not None else None))
        if any(g is None or not isinstance(g, torch.Tensor) for g in got):
            return None
        return torch.cat(got, dim)
    if shape is None:
        return None
    ins = [idx[a] for a in n.all_input_nodes if a in idx]
    if not ins or not all(isinstance(t, torch.Tensor) for t in ins):
        return None
    if name in _SAME:
        try:
            return _combine(ins, shape)
        except RuntimeError:  # not a broadcast of the output's shape
            return None
    if name in _MIX_LAST and len(ins) == 1:
        x = idx.get(first)
        if name in ("mm", "matmul") and x is None:
            return None  # the tokens are the right operand: positions are mixed
        if name == "addmm":
            x = idx.get(n.args[1])
        if not isinstance(x, torch.Tensor):
            return None
        if name == "native_layer_norm":
            return (_mix_last(x, shape), None, None)
        return _mix_last(x, shape)
    return None


def _sequence(x: torch.Tensor, length: int) -> Optional[TokenGrid]:
    """The grid a [.., L, ..] index reads as, when one of its first two dims is the sequence of ``length``."""
    if x.dim() != 3:
        return None
    for d in (1, 0):
        if x.shape[d] != length:
            continue
        rows = x.movedim(d, 0).reshape(length, -1)
        if not bool((rows.min(-1).values == rows.max(-1).values).all()):
            continue
        vals = rows[:, 0]
        if bool((vals == _MIXED).any()):
            continue
        at = torch.nonzero(vals >= 0).flatten()
        if at.numel() == 0:
            continue
        lo, hi = int(at[0]), int(at[-1]) + 1
        if torch.equal(vals[lo:hi], torch.arange(hi - lo)) and bool((vals[:lo] == -1).all()) and bool(
                (vals[hi:] == -1).all()):
            return TokenGrid(0, 0, lo, length - hi)
    return None


def _from_source(dg: nx.DiGraph, src: fx.Node, on_path: set, order: dict, length: int) -> Optional[TokenGrid]:
    """The grid of tokens made from spatial tensor ``src`` [B, C, rows, cols], if they reach the queries."""
    s = _ints(G.shape(src) or ())
    if s is None or len(s) != 4:
        return None
    b, c, rows, cols = s
    idx: dict = {src: torch.arange(rows * cols).reshape(1, 1, rows, cols).expand(b, c, rows, cols)}
    ahead = sorted((n for n in nx.descendants(dg, src) if n in on_path), key=order.__getitem__)
    for n in ahead:
        try:
            got = _step(n, idx)
        except Exception:  # an op we cannot replay: the walk stops there
            got = None
        if got is None:
            continue
        idx[n] = got
        if isinstance(got, torch.Tensor):
            g = _sequence(got, length)
            if g is not None and g.prefix + rows * cols + g.suffix == length:
                return TokenGrid(rows, cols, g.prefix, g.suffix)
    return None


def token_grid(dg: nx.DiGraph, q_input: fx.Node, length: int) -> Optional[TokenGrid]:
    """The site's token grid, or None when its queries do not come from one image grid of that size."""
    on_path = nx.ancestors(dg, q_input) | {q_input}
    order = {n: i for i, n in enumerate(dg.nodes)}
    sources = [n for n in on_path if G.opname(n) in _SOURCES and len(G.shape(n) or ()) == 4]
    found = set()
    for src in sources:
        g = _from_source(dg, src, on_path, order, length)
        if g is not None:
            found.add(g)
    if len(found) != 1:
        if len(found) > 1:
            logger.debug("several token grids reach %s: %s", q_input.name, found)
        return None
    return found.pop()
