"""``per_head``: a site's heads take different patterns, chosen per head on the calibration records.

Training-free, in the style of MoA and DuoAttention: every head's own error (relative L2 of that head's
output) is measured for each sinks + window size on the site's records, and for each of a few per-head error
levels a head takes the narrowest window whose error stays under the level, else stays dense. Each level is
one candidate; the planner then scores it as a whole (the site error) and spends the site's share of the
budget on it like on any other choice. The grid's choices are placeholders until ``prepare`` fits them, so a
site with no calibration records refuses the variant with that reason.
"""
from __future__ import annotations

from typing import Optional

import torch

import codegen
from codegen.variants import dense
from codegen.variants import sinks_window as window_kernel
from codegen.variants.per_head import KERNEL, head_specs
from passes.variants import Variant
from passes.variants._grid import modifier_reason, sequence_reason, windows

NAME = KERNEL.name
DEFAULTS: dict = {"block": 64}
PARAMS: dict = {"window": list, "sinks": list, "block": int}
LEVELS = (0.02, 0.05, 0.1, 0.2, 0.35)  # per-head relative L2 levels, one candidate each
SINKS = 4
MIN_KEYS = 256


def applies(site) -> Optional[str]:
    """Per-head patterns apply to self-attention over a sequence with several heads; returns a reason if not."""
    if site.num_heads is not None and 0 < site.num_heads < 2:
        return "one head: there is nothing to choose per head"
    if 0 <= site.kv_len < MIN_KEYS:
        # fitting measures every head at every window on the records; this short, the windows save little
        return f"{site.kv_len} keys: per-head windows are fitted from {MIN_KEYS} keys"
    return sequence_reason(site, cache=True) or modifier_reason(site)


def grid(site) -> list[dict]:
    """One placeholder per error level; ``prepare`` turns each into per-head windows from the records."""
    if not windows(site.kv_len):
        return []
    return [{"level": lvl} for lvl in LEVELS]


def _placeholder(params: dict) -> bool:
    return "level" in params


def head_errors(records: list, params: dict) -> torch.Tensor:
    """[H] float64: each head's relative L2 error over the records' meaningful rows under ``params``."""
    num = den = 0.0
    for r in records:
        with torch.no_grad():
            out = codegen.run(NAME, r.q, r.k, r.v, r.mask, r.scale, r.causal, softcap=r.softcap, fill=r.fill,
                              **params)
        diff = (out.double() - r.out.double()).pow(2).sum(-1)  # [B, H, P]
        ref = r.out.double().pow(2).sum(-1)
        if r.rows is not None:
            diff, ref = diff * r.rows[:, None], ref * r.rows[:, None]
        num = num + diff.sum((0, 2))
        den = den + ref.sum((0, 2))
    return (num / den.clamp(min=1e-300)).sqrt()


def fit(site, records: list) -> list[dict]:
    """Per-head (sinks, window) mixes, one per error level, each differing from a single pattern for all heads."""
    sizes = windows(site.kv_len)
    errs = {w: head_errors(records, {"window": [w], "sinks": [SINKS], "block": _block(w)}) for w in sizes}
    heads = len(next(iter(errs.values())))
    mixes, seen = [], set()
    for lvl in LEVELS:
        pick = []
        for h in range(heads):
            fits = [w for w in sizes if float(errs[w][h]) <= lvl]
            pick.append(min(fits) if fits else 0)
        key = tuple(pick)
        if key in seen or len(set(pick)) < 2:  # one pattern for every head is another variant's choice
            continue
        seen.add(key)
        narrow = min(w for w in pick if w > 0)
        mixes.append({"window": pick, "sinks": [SINKS if w else 0 for w in pick], "block": _block(narrow)})
    return mixes


def _block(window: int) -> int:
    return 32 if window <= 32 else 64


def prepare(sp, cands: list, records: list, index: int, say) -> None:
    """Fit the placeholders on the site's records: per-head windows at each error level."""
    holders = [c for c in cands if _placeholder(c.params)]
    if not holders:
        return
    if not records:
        mixes = []
        sp.refusals.append(f"{NAME}: its heads are chosen on calibration records, and there are none")
    else:
        mixes = fit(sp.site, records)
        if not mixes:
            sp.refusals.append(f"{NAME}: every error level gives one pattern for all heads")
    for c, params in zip(holders, mixes):
        c.params = params
        c.exact = False
    for c in holders[len(mixes):]:
        sp.options.remove(c)


def _groups(site, params: dict) -> dict:
    specs = head_specs(params["window"], params.get("sinks"), site.num_heads)
    out: dict = {}
    for s in specs:
        out[s] = out.get(s, 0) + 1
    return out


def price(site, params: dict, shape: dict) -> list:
    """Each group of heads priced as its own pattern over its share of the heads (one call runs them all)."""
    if _placeholder(params):  # not fitted yet: the cheapest mix it could become
        w = min(windows(site.kv_len))
        return [(window_kernel.KERNEL.name, {"window": w, "sinks": SINKS}, shape, None)]
    h, g = shape["H"], shape.get("G", shape["H"])
    terms = []
    for (sinks, window), n in _groups(site, params).items():
        part = {**shape, "H": n, "G": max(1, round(n * g / h))}
        if window == 0:
            terms.append((dense.KERNEL.name, {}, part, "online"))
        else:
            terms.append((window_kernel.KERNEL.name, {"window": window, "sinks": sinks}, part, None))
    return terms


def exact(site, params: dict) -> bool:
    """True when every head is dense or its window covers every key."""
    if _placeholder(params):
        return False
    n = max(site.q_len, site.kv_len)
    return all(w == 0 or w >= n for _, w in head_specs(params["window"], params.get("sinks"), site.num_heads))


def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    if _placeholder(params):
        return
    if "window" not in params:
        raise ValueError(f"{NAME}: window is required, one entry per head (0 = a dense head)")
    for name in ("window", "sinks"):
        got = params.get(name, [])
        vals = got if isinstance(got, (list, tuple)) else [got]
        if any(int(x) < 0 for x in vals):
            raise ValueError(f"{NAME}: {name} entries must be >= 0, not {list(vals)}")
    if params.get("block", 16) not in (16, 32, 64):
        raise ValueError(f"{NAME}: block must be 16, 32 or 64, not {params['block']}")


def fits(site, params: dict) -> Optional[str]:
    """Why a forced per-head list cannot run at this site (its length is not the head count)."""
    try:
        head_specs(params["window"], params.get("sinks"), site.num_heads)
    except (KeyError, ValueError) as e:
        return str(e)
    return None


VARIANT = Variant(
    name=NAME, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: grid(site),
    defaults=DEFAULTS, params=PARAMS, check=check_params, fits=fits, prepare=prepare, price=price)
