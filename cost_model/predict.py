"""Latency prediction: a roofline per kernel, and crossover lengths between variants."""
from __future__ import annotations

import functools
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Mapping

import sympy

from .analysis import einsum_counts, footprint, kernel_traffic, op_counts, passes
from .cascades import build
from .hardware import Hardware
from .ir import Cascade, Einsum, Kernel, sym

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("B", "H", "G", "P", "M", "E", "F")


@dataclass(frozen=True)
class KernelCost:
    """Symbolic cost of one kernel on a hardware profile."""

    name: str
    launches: sympy.Expr
    macs: sympy.Expr
    exps: sympy.Expr
    others: sympy.Expr
    reads: sympy.Expr
    writes: sympy.Expr
    compute_s: sympy.Expr
    memory_s: sympy.Expr
    seconds: sympy.Expr


def gemm_dims(c: Cascade, e: Einsum) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """(m, n, k) of one block matmul of a contraction: rows of the first operand, columns of
    the second, reduced depth (ranks shared by both operands and the output are batch)."""
    sizes = c.size_map
    a, b = (set(x.ranks) for x in e.inputs)
    o = set(e.out.ranks)
    m = _prod_sizes(sizes, (a & o) - b)
    n = _prod_sizes(sizes, (b & o) - a)
    k = _prod_sizes(sizes, set(e.reduce))
    return m, n, k


def _prod_sizes(sizes: Mapping[str, sympy.Expr], ranks: set[str]) -> sympy.Expr:
    out = sympy.Integer(1)
    for r in ranks:
        out *= sizes[r]
    return out


def _mac_time(c: Cascade, k: Kernel, hw: Hardware, subs: Mapping[sympy.Symbol, object] | None) -> sympy.Expr:
    """MAC time of a kernel; an eager kernel's matmuls run at the measured rate of their block shape."""
    total = sympy.Integer(0)
    prod = c.producer()
    for name in k.einsums:
        e = prod[name]
        if not e.is_contraction:
            continue
        macs = einsum_counts(c, e).macs
        rate = hw.rates(k.fused)[0]
        if not k.fused and hw.gemm_table:
            dims = [sympy.sympify(d).subs(subs or {}) for d in gemm_dims(c, e)]
            if all(d.is_number for d in dims):
                rate = hw.gemm_rate(*(float(d) for d in dims))
        total += macs / rate
    return total


def kernel_costs(c: Cascade, hw: Hardware, subs: Mapping[sympy.Symbol, object] | None = None) -> list[KernelCost]:
    """Roofline per kernel: launches * overhead + max(compute time, memory time).

    ``subs`` (known sizes) lets eager matmuls pick the measured rate of their block shape.
    """
    traffic, counts = _static(c, hw)
    out = []
    for k in c.kernel_list():
        oc = counts[k.name]
        mac_rate, exp_rate, other_rate = hw.rates(k.fused)
        parts = [_mac_time(c, k, hw, subs), oc.exps / exp_rate, oc.others / other_rate]
        compute = sympy.Max(*parts) if hw.overlap_units else sum(parts)
        t = traffic[k.name]
        memory = (t.reads / hw.read_bytes_per_s + t.writes / hw.write_bytes_per_s
                  + t.cached / hw.cache_bytes_per_s)
        launches = sympy.sympify(k.launches)
        secs = launches * hw.launch_s + sympy.Max(compute, memory)
        out.append(KernelCost(k.name, launches, oc.macs, oc.exps, oc.others, t.reads, t.writes, compute, memory,
                              secs))
    return out


# Shape-independent analyses of a cascade (op counts simplify symbolically, which is slow): computed
# once per cascade object and hardware profile.
_STATIC: "weakref.WeakKeyDictionary[Cascade, dict]" = weakref.WeakKeyDictionary()


def _static(c: Cascade, hw: Hardware) -> tuple[dict, dict]:
    per = _STATIC.setdefault(c, {})
    key = (hw.onchip_bytes, hw.cache_bytes, hw.dtype_bytes)
    if key not in per:
        traffic = {t.kernel: t for t in kernel_traffic(c, hw.onchip_bytes, hw.cache_bytes, hw.dtype_bytes)}
        per[key] = (traffic, {k.name: op_counts(c, k.einsums) for k in c.kernel_list()})
    return per[key]


def time_expr(c: Cascade, hw: Hardware, subs: Mapping[sympy.Symbol, object] | None = None) -> sympy.Expr:
    """Predicted seconds of a cascade as a sympy expression of its symbolic sizes."""
    return sum((k.seconds for k in kernel_costs(c, hw, subs)), sympy.Integer(0))


def cascade_for(variant: str, hw: Hardware, *, causal: bool = False, form: str | None = None,
                **params: object) -> Cascade:
    """The variant's cascade as it runs on ``hw`` (its schedule and attention tiles)."""
    try:
        return _cascade_cached(variant, hw, causal, form, tuple(sorted(params.items())))
    except TypeError:  # unhashable parameters (sympy objects are hashable; lists are not)
        tq, tk = hw.tiles()
        return build(variant, causal=causal, form=form, schedule=hw.schedule, tile_q=tq, tile_k=tk, **params)


@functools.lru_cache(maxsize=512)
def _cascade_cached(variant: str, hw: Hardware, causal: bool, form: str | None, params: tuple) -> Cascade:
    tq, tk = hw.tiles()
    return build(variant, causal=causal, form=form, schedule=hw.schedule, tile_q=tq, tile_k=tk, **dict(params))


@dataclass(frozen=True)
class Prediction:
    """Numeric figures for one variant at one shape on one hardware profile."""

    variant: str
    passes: int
    macs: float
    exps: float
    others: float
    bytes: float
    footprint: float
    seconds: float
    kernels: tuple[tuple[str, float], ...]

    @property
    def flops(self) -> dict[str, float]:
        """Op counts by class (a multiply-add counted once)."""
        return {"mac": self.macs, "exp": self.exps, "other": self.others}


def _subs(shape: Mapping[str, object]) -> dict[sympy.Symbol, object]:
    return {sym(k): v for k, v in shape.items()}


def _num(expr: sympy.Expr, subs: Mapping[sympy.Symbol, object]) -> float:
    val = sympy.sympify(expr).subs(subs)
    try:
        return float(val)
    except TypeError as exc:
        free = sorted(str(s) for s in sympy.sympify(val).free_symbols)
        raise ValueError(f"missing sizes for {', '.join(free)}") from exc


def predict(variant: str, shape: Mapping[str, object], hw: Hardware, *, causal: bool = False,
            form: str | None = None, **params: object) -> Prediction:
    """Predict one variant's op counts, bytes, footprint and seconds at a concrete shape."""
    c = cascade_for(variant, hw, causal=causal, form=form, **params)
    subs = _subs(shape)
    ks = kernel_costs(c, hw, subs)
    return Prediction(
        variant=variant,
        passes=passes(c),
        macs=sum(_num(k.macs, subs) for k in ks),
        exps=sum(_num(k.exps, subs) for k in ks),
        others=sum(_num(k.others, subs) for k in ks),
        bytes=sum(_num(k.reads + k.writes, subs) for k in ks),
        footprint=_num(footprint(c, hw.dtype_bytes), subs),
        seconds=sum(_num(k.seconds, subs) for k in ks),
        kernels=tuple((k.name, _num(k.seconds, subs)) for k in ks),
    )


# ---------------------------------------------------------------- crossovers
def _freeze(expr: sympy.Expr, point: Mapping[sympy.Symbol, float]) -> sympy.Expr:
    """Replace every Max/Min/Piecewise by the branch active at ``point``."""
    def rec(e: sympy.Expr) -> sympy.Expr:
        if not e.args:
            return e
        args = [rec(a) for a in e.args] if not isinstance(e, sympy.Piecewise) else None
        if isinstance(e, (sympy.Max, sympy.Min)):
            vals = [float(a.subs(point)) for a in args]
            pick = max if isinstance(e, sympy.Max) else min
            return args[vals.index(pick(vals))]
        if isinstance(e, sympy.Piecewise):
            for val, cond in e.args:
                if cond is sympy.true or bool(sympy.sympify(cond).subs(point)):
                    return rec(val)
            raise ValueError("no Piecewise branch holds")
        return e.func(*args)
    return rec(sympy.sympify(expr))


@dataclass(frozen=True)
class Crossover:
    """At sequence length ``n`` the cheapest variant changes from ``before`` to ``after``."""

    n: float
    before: str
    after: str


def crossovers(candidates: Mapping[str, Mapping[str, object]], shape: Mapping[str, object], hw: Hardware, *,
               causal: bool = False, lo: float = 16, hi: float = 1 << 20, n_symbol: str = "N",
               steps: int = 64) -> list[Crossover]:
    """Sequence lengths N (P = M = N unless the shape fixes them) where the cheapest variant changes.

    Brackets changes of the arg-min on a log grid, then solves time_a(N) = time_b(N) with
    sympy on the branch of every max/min active inside the bracket (falling back to
    bisection if the root leaves the bracket).
    """
    n = sym(n_symbol)
    base = {k: v for k, v in shape.items() if k not in ("P", "M")}
    subs = _subs(base)
    subs.setdefault(sym("P"), shape.get("P", n))
    subs.setdefault(sym("M"), shape.get("M", n))
    subs = {k: (sympy.sympify(v).subs(sym(n_symbol), n) if isinstance(v, (str, sympy.Expr)) else v)
            for k, v in subs.items()}
    exprs = {name: time_expr(cascade_for(name.split("@")[0], hw, causal=causal, **dict(p)), hw, subs).subs(subs)
             for name, p in candidates.items()}

    def best(x: float) -> str:
        vals = {k: float(e.subs(n, x)) for k, e in exprs.items()}
        return min(vals, key=vals.get)

    grid = [lo * (hi / lo) ** (i / steps) for i in range(steps + 1)]
    found: list[Crossover] = []
    prev = best(grid[0])
    for a, b in zip(grid, grid[1:]):
        cur = best(b)
        if cur == prev:
            continue
        diff = exprs[prev] - exprs[cur]
        root = None
        try:
            frozen = sympy.simplify(_freeze(diff, {n: math.sqrt(a * b)}))
            for r in sympy.solve(sympy.Eq(frozen, 0), n):
                r = complex(r)
                if abs(r.imag) < 1e-9 and a <= r.real <= b:
                    root = r.real
                    break
        except (NotImplementedError, ValueError, TypeError):
            root = None
        if root is None:
            x0, x1 = a, b
            for _ in range(60):
                mid = (x0 + x1) / 2
                if float(diff.subs(n, mid)) < 0:
                    x0 = mid
                else:
                    x1 = mid
            root = (x0 + x1) / 2
        found.append(Crossover(root, prev, cur))
        prev = cur
    return found
