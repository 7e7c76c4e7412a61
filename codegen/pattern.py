"""Sparsity patterns as key intervals per query, and the block maps derived from them.

Every structured variant describes what query i may see as a union of T inclusive key
intervals ``[lo[i,t], hi[i,t]]`` in absolute key positions (query i sits at M - P + i, queries at
the end of the keys).  From that one description come:

* the element mask of the naive reference (``visible``),
* the block map: for each query block, the key blocks it visits and which of them are *full*
  (every pair visible, so a kernel skips the element test), in BCSR form like FlexAttention's,
* the element test inside partial blocks.

The intervals are computed from the parameters in O(P·T): no P×M mask is built to find blocks.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

IntervalFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def query_positions(p: int, m: int, device=None) -> torch.Tensor:
    """Absolute positions of the P queries: bottom-right aligned, query i at M - P + i."""
    return torch.arange(m - p, m, device=device)


def finish(lo: torch.Tensor, hi: torch.Tensor, qpos: torch.Tensor, m: int, causal: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp intervals [P,T] to real keys [0, M) and, if causal, to keys j <= query position."""
    lo = lo.clamp(min=0)
    hi = hi.clamp(max=m - 1)
    if causal:
        hi = torch.minimum(hi, qpos[:, None])
    return lo.to(torch.int64), hi.to(torch.int64)


def visible(lo: torch.Tensor, hi: torch.Tensor, m: int) -> torch.Tensor:
    """Element mask [P, M] (True = visible) of a union of intervals; for references and tests."""
    j = torch.arange(m, device=lo.device)[None, :, None]
    return ((j >= lo[:, None, :]) & (j <= hi[:, None, :])).any(-1)


@dataclass(frozen=True)
class BlockMap:
    """Key blocks each query block visits (BCSR): ``idx[..., qb, s]`` for s < ``num[..., qb]``."""

    block_q: int
    block_k: int
    num: torch.Tensor    # [..., nq] int64
    idx: torch.Tensor    # [..., nq, S] int64, sorted, padded with the last valid index
    full: torch.Tensor   # [..., nq, S] bool: every pair visible (no element test needed)

    @property
    def slots(self) -> int:
        """S, the widest row of the map."""
        return int(self.idx.shape[-1])

    def density(self, m: int) -> float:
        """Fraction of key blocks visited, averaged over query blocks."""
        nk = max(1, math.ceil(m / self.block_k))
        return float(self.num.float().mean()) / nk


def _cover_counts(start: torch.Tensor, stop: torch.Tensor, nk: int) -> torch.Tensor:
    """[P, nk] bool: block b in [start, stop) for some interval t (difference array + cumsum)."""
    p = start.shape[0]
    ok = stop > start
    diff = torch.zeros(p, nk + 1, dtype=torch.int32, device=start.device)
    one = ok.to(torch.int32)
    diff.scatter_add_(1, start.clamp(0, nk).masked_fill(~ok, nk), one)
    diff.scatter_add_(1, stop.clamp(0, nk).masked_fill(~ok, nk), -one)
    return diff.cumsum(1)[:, :nk] > 0


def dense_blocks(lo: torch.Tensor, hi: torch.Tensor, m: int, block_q: int, block_k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[nq, nk] flags of an interval pattern: block visited, block full (blocks with padded keys are partial)."""
    p = lo.shape[0]
    nq, nk = math.ceil(p / block_q), math.ceil(m / block_k)
    nonempty = hi >= lo
    # touched: any key of the block inside the interval; covered: every key of the block inside
    t_start = torch.where(nonempty, lo // block_k, 0)
    t_stop = torch.where(nonempty, hi // block_k + 1, 0)
    c_start = torch.where(nonempty, (lo + block_k - 1) // block_k, 0)
    c_stop = torch.where(nonempty, (hi + 1) // block_k, 0)
    touched = _cover_counts(t_start, t_stop, nk)
    covered = _cover_counts(c_start, c_stop, nk)
    pad = nq * block_q - p
    if pad:  # padded query rows constrain nothing
        touched = torch.cat([touched, touched.new_zeros(pad, nk)])
        covered = torch.cat([covered, covered.new_ones(pad, nk)])
    anyb = touched.view(nq, block_q, nk).any(1)
    fullb = covered.view(nq, block_q, nk).all(1) & anyb
    return anyb, fullb


def block_map(lo: torch.Tensor, hi: torch.Tensor, m: int, block_q: int, block_k: int) -> BlockMap:
    """Derive the BCSR block map of an interval pattern."""
    return from_dense_blocks(*dense_blocks(lo, hi, m, block_q, block_k), block_q, block_k)


def from_dense_blocks(anyb: torch.Tensor, fullb: torch.Tensor, block_q: int, block_k: int) -> BlockMap:
    """BCSR from dense [..., nq, nk] visit/full flags (sorted indices, padded by repetition)."""
    nk = anyb.shape[-1]
    num = anyb.sum(-1)
    s = max(1, int(num.max()) if num.numel() else 1)
    key = torch.where(anyb, torch.arange(nk, device=anyb.device), nk)
    idx = key.sort(-1).values[..., :s]
    slot = torch.arange(s, device=anyb.device)
    valid = slot < num[..., None]
    # pad with the row's last valid block so a gather stays in range; padded slots are never read as valid
    last = idx.gather(-1, (num - 1).clamp(min=0)[..., None])
    idx = torch.where(valid, idx, last).clamp(max=max(nk - 1, 0))
    full = fullb.gather(-1, idx) & valid
    return BlockMap(block_q, block_k, num, idx, full)


@dataclass(frozen=True)
class Bound:
    """A key position as a function of query i's absolute position: ``(i // stride) * stride + offset``
    (anchor ``query``), ``offset`` (anchor ``first``: from key 0) or ``M - 1 + offset`` (anchor ``last``)."""

    anchor: str = "query"
    offset: int = 0
    stride: int = 1

    def at(self, qpos: torch.Tensor, m: int) -> torch.Tensor:
        """The bound for each query position."""
        if self.anchor == "query":
            base = qpos if self.stride == 1 else torch.div(qpos, self.stride, rounding_mode="floor") * self.stride
            return base + self.offset
        if self.anchor == "first":
            return torch.full_like(qpos, self.offset)
        if self.anchor == "last":
            return torch.full_like(qpos, m - 1 + self.offset)
        raise ValueError(f"unknown bound anchor {self.anchor!r}")


@dataclass(frozen=True)
class Span:
    """Keys ``[lo, hi]`` (inclusive) that a query sees; bounds never decrease as the query moves on."""

    lo: Bound
    hi: Bound
    name: str = "keys"


EVERY_KEY = Span(Bound("first", 0), Bound("last", 0), "all keys")


def spans_pattern(spans: Callable[..., list[Span]]) -> IntervalFn:
    """The interval function ``fn(qpos, m, p, **params) -> (lo, hi)`` [P,T] of a variant's spans."""

    def fn(qpos: torch.Tensor, m: int, p: int, **params) -> tuple[torch.Tensor, torch.Tensor]:
        got = list(spans(**params))
        lo = torch.stack([s.lo.at(qpos, m) for s in got], dim=1)
        hi = torch.stack([s.hi.at(qpos, m) for s in got], dim=1)
        return lo, hi

    return fn


PATTERNS: dict[str, IntervalFn] = {}


def register_pattern(name: str):
    """Register ``fn(qpos, m, p, **params) -> (lo, hi)`` [P,T] as variant ``name``'s pattern."""

    def deco(fn):
        PATTERNS[name] = fn
        return fn

    return deco


def intervals(name: str, params: tuple, p: int, m: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Finished (clamped) intervals [P,T] of registered pattern ``name`` with ``params`` items."""
    qpos = query_positions(p, m)
    lo, hi = PATTERNS[name](qpos, m, p, **dict(params))
    return finish(lo, hi, qpos, m, causal)


@functools.lru_cache(maxsize=64)
def cached_block_map(name: str, params: tuple, p: int, m: int, causal: bool, block_q: int, block_k: int
                     ) -> tuple[BlockMap, torch.Tensor, torch.Tensor]:
    """Block map and intervals of a registered pattern, memoised per (params, lengths)."""
    lo, hi = intervals(name, params, p, m, causal)
    return block_map(lo, hi, m, block_q, block_k), lo, hi
