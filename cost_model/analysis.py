"""Symbolic analyses of a cascade: op counts by class, pass count, bytes moved, footprint."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import reduce
from operator import mul

import sympy

from .ir import Access, Cascade, Einsum, Kernel, Predicate

logger = logging.getLogger(__name__)

ONE = sympy.Integer(1)
ZERO = sympy.Integer(0)


def _prod(xs) -> sympy.Expr:
    return reduce(mul, xs, ONE)


# ---------------------------------------------------------------- predicate pair counts
def _sum_min(lo: sympy.Expr, hi: sympy.Expr, c: sympy.Expr, cap: sympy.Expr) -> sympy.Expr:
    """Closed form of sum_{a=lo}^{hi-1} min(a + c, cap) (hi >= lo)."""
    s = sympy.Min(sympy.Max(cap - c, lo), hi)
    return (s - lo) * (lo + s - 1) / 2 + c * (s - lo) + cap * (hi - s)


def _sum_clip(lo: sympy.Expr, hi: sympy.Expr, c: sympy.Expr, low: sympy.Expr, high: sympy.Expr) -> sympy.Expr:
    """Closed form of sum_{a=lo}^{hi-1} clip(a + c, low, high) for low <= high."""
    return _sum_min(lo, hi, c, high) - _sum_min(lo, hi, c, low) + low * (hi - lo)


def visible_pairs(pred: Predicate, n_q: sympy.Expr, n_k: sympy.Expr) -> sympy.Expr:
    """Number of (query, key) pairs the predicate keeps, queries aligned to the last keys.

    Query i sits at absolute position a = (n_k - n_q) + i, so decode (n_q = 1) sees every
    key under ``causal``.  Work skipped at tile granularity adds, per query, half a tile
    for every bound of the visible interval that moves with the query.
    """
    o = n_k - n_q
    lo, hi = o, n_k
    kind = pred.kind
    if kind == "local":
        return n_q * n_k
    if kind == "causal":
        exact = _sum_min(lo, hi, ONE, n_k)
        sloped = 1
    elif kind in ("window", "window_sinks"):
        w = pred.param("W")
        if pred.causal:
            exact = _sum_min(lo, hi, ONE, w)
            sloped = 2
        else:
            upper = _sum_min(lo, hi, w, n_k)
            # sum max(a-W+1, 0) = sum(a-W+1) - sum min(a-W+1, 0)
            lower = (hi - lo) * (lo + hi - 1) / 2 + (1 - w) * (hi - lo) - _sum_min(lo, hi, 1 - w, ZERO)
            exact = upper - lower
            sloped = 2
        if kind == "window_sinks":
            exact = exact + _sum_clip(lo, hi, 1 - w, ZERO, pred.param("S"))
    else:
        raise ValueError(f"unknown predicate kind {kind!r}")
    if not pred.skip:
        return n_q * n_k
    waste = n_q * sloped * ((pred.tile_q - 1) / 2 + (pred.tile_k - 1) / 2)
    return exact + waste


def points(c: Cascade, e: Einsum) -> sympy.Expr:
    """Points of an Einsum's iteration space that are computed (predicate-aware)."""
    sizes = c.size_map
    space = e.space
    full = _prod(sizes[r] for r in space)
    pred = e.predicate
    if pred is None:
        return full
    kparts = {pred.key} | {p for w, ps in c.splits if w == pred.key for p in ps}
    qparts = {pred.query} | {p for w, ps in c.splits if w == pred.query for p in ps}
    in_space_k = [r for r in space if r in kparts]
    in_space_q = [r for r in space if r in qparts]
    if not in_space_k or not in_space_q:
        return full
    others = _prod(sizes[r] for r in space if r not in kparts and r not in qparts)
    n_q = _rank_total(c, pred.query)
    n_k = _rank_total(c, pred.key)
    pairs = visible_pairs(pred, n_q, n_k)
    covered_k = _prod(sizes[r] for r in in_space_k)
    covered_q = _prod(sizes[r] for r in in_space_q)
    # an Einsum over only the outer tile rank (e.g. running max per key tile) sees block pairs
    return others * pairs * (covered_k / n_k) * (covered_q / n_q)


def _rank_total(c: Cascade, rank: str) -> sympy.Expr:
    sizes = c.size_map
    if rank in sizes:
        return sizes[rank]
    for whole, pieces in c.splits:
        if whole == rank:
            return _prod(sizes[p] for p in pieces)
    raise KeyError(rank)


# ---------------------------------------------------------------- op counts
@dataclass(frozen=True)
class OpCounts:
    """Operation counts by unit class (sympy expressions)."""

    macs: sympy.Expr
    exps: sympy.Expr
    others: sympy.Expr

    def __add__(self, other: "OpCounts") -> "OpCounts":
        return OpCounts(self.macs + other.macs, self.exps + other.exps, self.others + other.others)


def einsum_counts(c: Cascade, e: Einsum) -> OpCounts:
    """Multiply-adds, exponentials and other element ops of one Einsum."""
    pts = points(c, e)
    if e.is_contraction:
        macs, exps, others = pts, ZERO, ZERO
    else:
        macs = ZERO
        n_exp = sum(1 for o in e.ops if o in ("exp", "phi"))
        # phi = elu(x)+1 = x>0 ? x+1 : exp(x): one exp plus a compare/select and an add
        n_other = sum(1 for o in e.ops if o != "exp") + sum(1 for o in e.ops if o == "phi")
        if e.reduce_op:
            n_other += 1
        exps, others = pts * n_exp, pts * n_other
    if e.predicate is not None and not e.predicate.skip:
        # the mask's select is applied once per (query, key) element it guards, not once per multiply-add
        others = others + pts / _unmasked_extent(c, e)
    return OpCounts(macs, exps, others)


def _unmasked_extent(c: Cascade, e: Einsum) -> sympy.Expr:
    """Size of the ranks of a contraction's space that the mask's select does not run over (1 if none).

    The select runs over the score-shaped operand: the input indexed by both a query and a key rank
    (``A`` in ``A·V``), else the output (``S`` in ``Q·Kᵀ``). Element-wise Einsums select every point.
    """
    if not e.is_contraction:
        return ONE
    pred = e.predicate
    sizes = c.size_map
    kparts = {pred.key} | {p for w, ps in c.splits if w == pred.key for p in ps}
    qparts = {pred.query} | {p for w, ps in c.splits if w == pred.query for p in ps}
    scored = [a for a in e.inputs if set(a.ranks) & kparts and set(a.ranks) & qparts]
    grid = set(scored[0].ranks if scored else e.out.ranks)
    return _prod(sizes[r] for r in e.space if r not in grid)


def op_counts(c: Cascade, names: tuple[str, ...] | None = None) -> OpCounts:
    """Total op counts of a cascade (or of the named Einsums)."""
    total = OpCounts(ZERO, ZERO, ZERO)
    for e in c.einsums:
        if names is None or e.name in names:
            total = total + einsum_counts(c, e)
    return OpCounts(*(sympy.simplify(x) for x in (total.macs, total.exps, total.others)))


# ---------------------------------------------------------------- passes
def _iterates_key(c: Cascade, e: Einsum) -> bool:
    return bool(set(e.space) & c.key_parts)


def _family(c: Cascade, rank: str) -> str:
    for whole, pieces in c.splits:
        if rank in pieces:
            return whole
    return rank


def _completes_key(c: Cascade, e: Einsum) -> bool:
    """True if the output needs a whole sweep of the keys.

    That is a reduction over a key rank whose output keeps nothing of that rank (a partial
    reduction over the inner tile keeps the outer tile index) and carries no running index.
    """
    if not _iterates_key(c, e):
        return False
    out_key = set(e.out.ranks) & c.key_parts
    if out_key & set(c.iterative):
        return False
    kept = {_family(c, r) for r in out_key}
    return any(r in c.key_parts and _family(c, r) not in kept for r in e.reduce) or (
        not out_key and bool(set(e.space) & c.key_parts) and bool(e.reduce))


def pass_levels(c: Cascade) -> dict[str, int]:
    """Pass (1-based) in which each key-iterating Einsum runs; 0 for Einsums outside passes.

    A key-iterating Einsum reading a tensor that is complete only after a whole sweep of
    the key rank (a full reduction, or a running value read at its final index) must run
    in a later pass than that tensor's producer.
    """
    prod = c.producer()
    level = {e.name: (1 if _iterates_key(c, e) else 0) for e in c.einsums}
    ready: dict[str, int] = {}

    def ready_pass(a: Access) -> int:
        t = a.tensor
        if t not in prod:
            return 1
        p = prod[t]
        if _iterates_key(c, p):
            done = _completes_key(c, p) or bool(a.final & c.key_parts)
            return level[p.name] + (1 if done else 0)
        return ready.get(t, 1)

    for _ in range(2 * len(c.einsums) + 2):
        changed = False
        for e in c.einsums:
            need = max((ready_pass(a) for a in e.inputs if a.tensor != e.name), default=1)
            if _iterates_key(c, e):
                new = max(1, need)
                if new != level[e.name]:
                    level[e.name], changed = new, True
            else:
                if ready.get(e.name) != need:
                    ready[e.name], changed = need, True
        if not changed:
            break
    else:  # pragma: no cover - cycles through full reductions cannot converge
        raise ValueError(f"cascade {c.name}: pass structure does not converge")
    return level


def passes(c: Cascade) -> int:
    """Number of passes over the key rank, derived from the cascade's dependencies."""
    return max(pass_levels(c).values(), default=0)


# ---------------------------------------------------------------- bytes and footprint
def _storage_size(c: Cascade, a: Access, keep_iterative: bool) -> sympy.Expr:
    sizes = c.size_map
    return _prod(ONE if (r in c.iterative and not keep_iterative) else sizes[r] for r in a.ranks)


def _access_of(c: Cascade, tensor: str) -> Access:
    prod = c.producer()
    if tensor in prod:
        return prod[tensor].out
    for e in c.einsums:
        for a in e.inputs:
            if a.tensor == tensor:
                return a
    raise KeyError(tensor)


@dataclass(frozen=True)
class Traffic:
    """Main-memory bytes of one kernel, split into reads and writes."""

    kernel: str
    reads: sympy.Expr
    writes: sympy.Expr
    cached: sympy.Expr = ZERO

    @property
    def total(self) -> sympy.Expr:
        """Main-memory reads plus writes (hand-overs through the shared cache excluded)."""
        return self.reads + self.writes


def kernel_traffic(
    c: Cascade,
    capacity_bytes: float | sympy.Expr,
    cache_bytes: float | sympy.Expr = 0,
    dtype_bytes: int | None = None,
) -> list[Traffic]:
    """Bytes each kernel moves to and from main memory for an on-chip capacity.

    Rules.  A kernel's grid spreads its parallel ranks; a fused kernel tiles queries by
    ``tile_q`` rows, an eager (library) kernel works a row at a time.  An outside tensor is
    read in the first pass that needs it; a later pass reads it again only if its slice per
    grid cell does not fit on chip.  In a fused kernel a key-indexed tensor whose slice per
    (batch, head) does not fit on chip is re-read for every query tile and every query head
    sharing it (the FlashAttention Θ(N²d²/M) term).  An intermediate read by a later pass is
    written and re-read when its slice per grid cell does not fit on chip.  Tensors passed
    between kernels go through main memory unless they fit in the shared cache, in which case
    they are counted in ``cached`` (moved at cache bandwidth).
    """
    nb = dtype_bytes or c.dtype_bytes
    cap = sympy.sympify(capacity_bytes)
    llc = sympy.sympify(cache_bytes)
    prod = c.producer()
    level = pass_levels(c)
    kernels = c.kernel_list()
    kernel_of = {n: k.name for k in kernels for n in k.einsums}
    consumers: dict[str, set[str]] = {}
    for e in c.einsums:
        for a in e.inputs:
            consumers.setdefault(a.tensor, set()).add(kernel_of[e.name])
    out: list[Traffic] = []
    for k in kernels:
        members = [prod[n] for n in k.einsums]
        parallel = _parallel_ranks(c, members)
        tq = c.tile_q if k.fused else ONE
        reads, writes, cached = ZERO, ZERO, ZERO
        levels_reading: dict[str, list[int]] = {}
        access: dict[str, Access] = {}
        for e in members:
            for a in e.inputs:
                if a.tensor in prod and kernel_of[a.tensor] == k.name:
                    continue
                levels_reading.setdefault(a.tensor, [])
                if level[e.name] not in levels_reading[a.tensor]:
                    levels_reading[a.tensor].append(level[e.name])
                access.setdefault(a.tensor, a)
        for t, lv in levels_reading.items():
            a = access[t]
            full = _storage_size(c, a, keep_iterative=True) * nb
            if t in prod:
                # handed over by another kernel: from the shared cache when it fits there
                cached += _if_fits(llc, full, full)
                reads += _unless_fits(llc, full, full)
                continue
            first = full
            if k.fused and set(a.ranks) & c.key_parts:
                first = full * _refetch(c, a, parallel, tq, cap, nb)
            reads += first
            if len(lv) > 1:
                cell = full / _prod(_trip(c, r, tq) for r in a.ranks if r in parallel)
                reads += (len(lv) - 1) * _unless_fits(cap, cell, first)
        for e in members:
            if e.name in c.outputs or not level.get(e.name):
                continue
            later = {level[x.name] for x in members if any(a.tensor == e.name for a in x.inputs)
                     and level[x.name] > level[e.name]}
            if not later or not (set(e.out.ranks) & c.key_parts):
                continue
            full = _storage_size(c, e.out, keep_iterative=False) * nb
            cell = full / _prod(_trip(c, r, tq) for r in e.out.ranks if r in parallel)
            writes += _unless_fits(cap, cell, full)
            reads += len(later) * _unless_fits(cap, cell, full)
        for e in members:
            leaves = e.name in c.outputs or (consumers.get(e.name, set()) - {k.name})
            if not leaves:
                continue
            full = _storage_size(c, e.out, keep_iterative=True) * nb
            if e.name in c.outputs:
                writes += full
            else:
                cached += _if_fits(llc, full, full)
                writes += _unless_fits(llc, full, full)
        out.append(Traffic(k.name, reads, writes, cached))
    return out


def _nonnegative(x: sympy.Expr) -> bool | None:
    """Whether ``x`` >= 0 from the symbols' own assumptions (sizes are positive), else None.

    The old assumptions system answers in microseconds; ``sympy.ask``'s SAT solver took seconds per
    call and decided nothing more for these expressions (an undecided case stays a Piecewise that is
    resolved once sizes are known).
    """
    x = sympy.sympify(x)
    if x.is_number:
        return bool(x >= 0)
    return x.is_nonnegative


def _fits(cap: sympy.Expr, size: sympy.Expr) -> bool:
    return _nonnegative(cap - size) is True


def _if_fits(cap: sympy.Expr, size: sympy.Expr, cost: sympy.Expr) -> sympy.Expr:
    """``cost`` if ``size`` fits in ``cap``, else 0 (a Piecewise while undecided)."""
    return cost - _unless_fits(cap, size, cost)


def _unless_fits(cap: sympy.Expr, size: sympy.Expr, cost: sympy.Expr) -> sympy.Expr:
    """``cost`` if ``size`` exceeds ``cap``, else 0 (a Piecewise while undecided)."""
    verdict = _nonnegative(cap - size)
    if verdict is True:
        return ZERO
    if verdict is False:
        return cost
    return sympy.Piecewise((ZERO, size <= cap), (cost, True))


def _parallel_ranks(c: Cascade, members: list[Einsum]) -> list[str]:
    """Ranks a kernel spreads over its grid: output ranks that also index a query-side operand
    (one with no key rank), never reduced and never iterative."""
    reduced = {r for e in members for r in e.reduce}
    query_side = {r for e in members for a in e.inputs if not (set(a.ranks) & c.key_parts) for r in a.ranks}
    ranks: list[str] = []
    for e in members:
        for r in e.out.ranks:
            if (r not in reduced and r not in c.iterative and r not in c.key_parts and r in query_side
                    and r not in c.tile_ranks and r not in ranks):
                ranks.append(r)
    return ranks


def _trip(c: Cascade, rank: str, tile_q: sympy.Expr) -> sympy.Expr:
    size = c.size_map[rank]
    if rank == c.query:
        return sympy.Max(1, size / tile_q)
    return size


def _refetch(c: Cascade, a: Access, parallel: list[str], tile_q: sympy.Expr, cap: sympy.Expr,
             nb: int) -> sympy.Expr:
    grid_missing = [r for r in parallel if r not in a.ranks]
    if not grid_missing:
        return ONE
    indexed_parallel = [r for r in a.ranks if r in parallel]
    slice_bytes = _storage_size(c, a, keep_iterative=True) * nb / _prod(
        c.size_map[r] for r in indexed_parallel)
    # the query tile packs the query rows with the query heads that share this KV head
    packed = [r for r in grid_missing if r == c.query or r in c.query_pack]
    rest = [r for r in grid_missing if r not in packed]
    factor = _prod(c.size_map[r] for r in rest)
    if packed:
        factor = factor * sympy.Max(1, _prod(c.size_map[r] for r in packed) / tile_q)
    return ONE + _unless_fits(cap, slice_bytes, factor - 1)


def bytes_moved(c: Cascade, capacity_bytes: float | sympy.Expr, cache_bytes: float | sympy.Expr = 0,
                dtype_bytes: int | None = None) -> sympy.Expr:
    """Total main-memory bytes of a cascade for an on-chip capacity (see kernel_traffic)."""
    return sum((t.total for t in kernel_traffic(c, capacity_bytes, cache_bytes, dtype_bytes)), ZERO)


def footprint(c: Cascade, dtype_bytes: int | None = None) -> sympy.Expr:
    """Peak bytes of live intermediates over the cascade order (running values count once)."""
    nb = dtype_bytes or c.dtype_bytes
    order = [e.name for e in c.einsums]
    last_use: dict[str, int] = {}
    for i, e in enumerate(c.einsums):
        for a in e.inputs:
            last_use[a.tensor] = i
    live_sizes = []
    for i, e in enumerate(c.einsums):
        live = [t for j, t in enumerate(order[: i + 1])
                if t not in c.outputs and last_use.get(t, -1) >= i or (j == i and t not in c.outputs)]
        live_sizes.append(sum((_storage_size(c, c.einsum(t).out, keep_iterative=False) for t in set(live)), ZERO))
    if not live_sizes:
        return ZERO
    return sympy.Max(*live_sizes) * nb


def launches(k: Kernel) -> sympy.Expr:
    """Number of launches of a kernel."""
    return sympy.sympify(k.launches)
