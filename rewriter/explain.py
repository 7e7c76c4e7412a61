"""``rewriter explain``: every candidate at each site, priced by the cost model, and where the cheapest changes."""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

from cost_model.predict import predict
from passes import pricing
from passes.planner import available, site_candidates
from passes.site import AttentionSite

logger = logging.getLogger(__name__)

PER_VARIANT = 3  # candidates shown per variant (the planner's grid can be long)


def _human(x: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(x) < 1000 or prefix == "P":
            return f"{x:.3g} {prefix}{unit}"
        x /= 1000
    return f"{x:.3g}"


def price(site: AttentionSite, variant: str, params: dict, hw, length: Optional[int] = None) -> dict[str, Any]:
    """Cascade(s), passes, FLOPs, bytes and predicted seconds of ``variant`` at ``site`` (sum over its kernels)."""
    shape = pricing.site_shape(site, length)
    if shape is None:
        return {}
    causal = site.causal and variant != "neighborhood_2d"
    cascades, passes, flops, nbytes = [], 0, 0.0, 0.0
    # pricing's terms are the one place a variant is mapped onto cost-model cascades
    for cascade, prm, shp, form in pricing._terms(site, variant, params, shape):
        pred = predict(cascade, shp, hw, causal=causal, form=form, **prm)
        cascades.append(cascade if not prm else f"{cascade}({','.join(f'{k}={v}' for k, v in sorted(prm.items()))})")
        passes = max(passes, pred.passes)
        flops += 2 * pred.macs + pred.exps + pred.others
        nbytes += pred.bytes
    return {"cascade": " + ".join(cascades), "passes": passes, "flops": flops, "bytes": nbytes,
            "seconds": pricing.seconds(site, variant, params, hw, length)}


def _label(variant: str, params: dict) -> str:
    shown = {k: v for k, v in sorted(params.items()) if k != "block"}
    return variant + (f"({','.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")


def cheapest_changes(site: AttentionSite, cands: list[tuple[str, dict]], hw, high: int,
                     low: int = 64) -> list[tuple[int, str, str]]:
    """(length, before, after) where the cheapest candidate changes, on a grid of 4 points per octave."""
    lengths, n = [], float(low)
    while n <= high:
        lengths.append(int(round(n)))
        n *= 2 ** 0.25
    changes, prev = [], None
    for n in lengths:
        times = {}
        for v, p in cands:
            t = pricing.seconds(site, v, p, hw, length=n)
            if t is not None and math.isfinite(t):
                times[_label(v, p)] = t
        if not times:
            continue
        best = min(times, key=times.get)
        if prev is not None and best != prev:
            changes.append((n, prev, best))
        prev = best
    return changes


def explain_model(model, example_inputs, target: str = "cpu", max_len: Optional[int] = None) -> str:
    """The explain text for every attention site of ``model`` on ``example_inputs``."""
    from rewriter.api import find_attention

    hw = pricing.profile(target)
    sites = find_attention(model, example_inputs)
    lines = [f"{len(sites)} attention site(s); hardware {hw.name} ({hw.source})"]
    groups: dict[tuple, list[AttentionSite]] = {}
    for s in sites:  # identical shapes price identically: explain each shape once
        key = (s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim, s.q_len, s.kv_len, s.causal, s.mask_kind,
               s.is_cross, s.window, s.rewritable)
        groups.setdefault(key, []).append(s)
    allowed = {name: None for name in available()}
    for group in groups.values():
        s = group[0]
        names = ", ".join(str(x.index) for x in group)
        lines += ["", f"site(s) {names}: {s.describe()}"]
        if not s.rewritable:
            lines.append(f"  not rewritable: {s.reason}")
            continue
        sp = site_candidates(s, allowed, hw, forced=True)
        shown: dict[str, int] = {}
        cands = [("dense", {})]
        for c in sp.options:
            if c.params.get("delta") or shown.get(c.variant, 0) >= PER_VARIANT:
                continue
            shown[c.variant] = shown.get(c.variant, 0) + 1
            cands.append((c.variant, dict(c.params)))
        rows = [("candidate", "cascade", "passes", "FLOPs", "bytes", "predicted", "vs dense")]
        dense_t = pricing.seconds(s, "dense", {}, hw)
        for v, p in cands:
            f = price(s, v, p, hw)
            if not f:
                continue
            t = f["seconds"]
            rows.append((_label(v, p), f["cascade"], str(f["passes"]), _human(f["flops"], "FLOP"),
                         _human(f["bytes"], "B"), "-" if t is None else f"{1e3 * t:.3g} ms",
                         "-" if not (t and dense_t) else f"{dense_t / t:.2f}x"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        for why in sp.refusals:
            lines.append(f"  not offered: {why}")
        high = max_len or 16 * max(int(s.q_len), int(s.kv_len), 64)
        changes = cheapest_changes(s, cands, hw, high)
        lines.append(f"  cheapest by length (64..{high}): " + (
            "; ".join(f"from ~{n}: {b} (was {a})" for n, a, b in changes) if changes else
            f"{_label(*cands[0]) if len(cands) == 1 else 'no change'} over the whole range"))
    return "\n".join(lines)
