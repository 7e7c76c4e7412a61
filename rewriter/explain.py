"""``rewriter explain``: every candidate at each site, priced by the cost model, and where the cheapest changes."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import sympy

from cost_model.analysis import passes
from cost_model.ir import sym
from cost_model.predict import cascade_for, kernel_costs
from passes import pricing
from passes.planner import available
from passes.site import AttentionSite
from passes.variants import VARIANTS, exact_name

logger = logging.getLogger(__name__)

PER_VARIANT = 2  # parameter choices shown per variant (its smallest and largest in the planner's grid)


def _human(x: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(x) < 1000 or prefix == "P":
            return f"{x:.3g} {prefix}{unit}"
        x /= 1000
    return f"{x:.3g}"


@dataclass(frozen=True)
class Priced:
    """One candidate's cost as functions of the sequence length N (compiled once from the cascade)."""

    label: str
    cascade: str
    passes: int
    seconds: Callable[[float], float]
    flops: Callable[[float], float]
    bytes: Callable[[float], float]


def priced(site: AttentionSite, variant: str, params: dict, hw) -> Optional[Priced]:
    """``variant`` at ``site`` with P = M = N symbolic, compiled to plain functions of N.

    ``predict`` substitutes sizes into sympy expressions (about a second per shape); sweeping
    lengths needs each expression once and a compiled function evaluated in microseconds.
    """
    shape = pricing.site_shape(site)
    if shape is None:
        return None
    n = sym("N")
    causal = site.causal and not VARIANTS[variant].never_causal
    names, n_passes, secs, flops, nbytes = [], 0, sympy.Integer(0), sympy.Integer(0), sympy.Integer(0)
    # pricing's terms are the one place a variant is mapped onto cost-model cascades
    for cascade, prm, shp, form in pricing._terms(site, variant, params, shape):
        sizes = {sym(k): v for k, v in shp.items()}
        sizes[sym("P")] = n if shp["P"] == site.q_len and site.q_len == site.kv_len else sympy.ceiling(
            n * shp["P"] / max(1, site.q_len))
        sizes[sym("M")] = n
        c = cascade_for(cascade, hw, causal=causal, form=form, **prm)
        ks = kernel_costs(c, hw, sizes)
        secs += sum((k.seconds for k in ks), sympy.Integer(0)).subs(sizes)
        flops += sum((2 * k.macs + k.exps + k.others for k in ks), sympy.Integer(0)).subs(sizes)
        nbytes += sum((k.reads + k.writes for k in ks), sympy.Integer(0)).subs(sizes)
        n_passes = max(n_passes, passes(c))
        names.append(cascade if not prm else f"{cascade}({','.join(f'{k}={v}' for k, v in sorted(prm.items()))})")
    fn = lambda e: sympy.lambdify(n, e, "math")  # noqa: E731
    return Priced(_label(variant, params), " + ".join(names), n_passes, fn(secs), fn(flops), fn(nbytes))


def _label(variant: str, params: dict) -> str:
    shown = {k: v for k, v in sorted(params.items()) if k != "block"}
    return variant + (f"({','.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")


def cheapest_changes(cands: list[Priced], high: int, low: int = 64) -> list[tuple[int, str, str]]:
    """(length, before, after) where the cheapest candidate changes, on a grid of 8 points per octave."""
    changes, prev, x = [], None, float(low)
    while x <= high:
        n = int(round(x))
        times = {c.label: float(c.seconds(n)) for c in cands}
        best = min(times, key=times.get)
        if prev is not None and best != prev:
            changes.append((n, prev, best))
        prev, x = best, x * 2 ** 0.125
    return changes


def candidates(site: AttentionSite, allowed: Iterable[str]) -> tuple[list[tuple[str, dict]], list[str]]:
    """(variant, params) to explain at ``site`` (dense first) and the variants refused with the reason."""
    base = exact_name()
    out, refused = [(base, {})], []
    for name in allowed:
        if name == base:
            continue
        rec = VARIANTS[name]
        why = rec.applies(site)
        if why:
            refused.append(f"{name}: {why}")
            continue
        grid = [p for p in rec.grid(site, {}) if not p.get("delta")]
        if not grid:
            refused.append(f"{name}: no parameter choice fits the site's shape")
        defaults = rec.defaults
        for p in (grid[:1] + grid[-1:] if len(grid) > 1 else grid)[:PER_VARIANT]:
            out.append((name, {**{k: v for k, v in defaults.items() if k not in p}, **p}))
    return out, refused


def explain_model(model, example_inputs, target: str = "cpu", max_len: Optional[int] = None,
                  variants: Optional[Iterable[str]] = None, progress: Optional[Callable[[str], None]] = None) -> str:
    """The explain text for every attention site of ``model`` on ``example_inputs``."""
    from rewriter.api import find_attention

    say = progress or (lambda msg: logger.info("%s", msg))
    hw = pricing.profile(target)
    sites = find_attention(model, example_inputs)
    lines = [f"{len(sites)} attention site(s); hardware {hw.name} ({hw.source})"]
    groups: dict[tuple, list[AttentionSite]] = {}
    for s in sites:  # identical shapes price identically: explain each shape once
        key = (s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim, s.q_len, s.kv_len, s.causal, s.mask_kind,
               s.is_cross, s.window, s.rewritable)
        groups.setdefault(key, []).append(s)
    allowed = list(variants) if variants else available()
    for group in groups.values():
        s = group[0]
        lines += ["", f"site(s) {', '.join(str(x.index) for x in group)}: {s.describe()}"]
        if not s.rewritable:
            lines.append(f"  not rewritable: {s.reason}")
            continue
        todo, refused = candidates(s, allowed)
        say(f"pricing {len(todo)} candidate(s) at site {s.index} (cascades compiled once per candidate)")
        cands = [c for c in (priced(s, v, p, hw) for v, p in todo) if c is not None]
        if not cands:
            lines.append("  symbolic shape: nothing to price")
            continue
        n0 = max(int(s.q_len), int(s.kv_len))
        dense_t = float(cands[0].seconds(n0))
        rows = [("candidate", "cascade", "passes", "FLOPs", "bytes", f"predicted @{n0}", "vs dense")]
        for c in cands:
            t = float(c.seconds(n0))
            rows.append((c.label, c.cascade, str(c.passes), _human(float(c.flops(n0)), "FLOP"),
                         _human(float(c.bytes(n0)), "B"), f"{1e3 * t:.3g} ms", f"{dense_t / t:.2f}x"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines += [f"  not offered: {why}" for why in refused]
        high = max_len or 16 * max(n0, 64)
        changes = cheapest_changes(cands, high)
        start = min(cands, key=lambda c: float(c.seconds(64))).label
        lines.append(f"  cheapest by length (64..{high}): {start} at 64" + "".join(
            f"; {b} from ~{n}" for n, _, b in changes))
    return "\n".join(lines)
