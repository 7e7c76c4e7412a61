"""``gqa_merge``: KV heads merged in groups (MHA -> GQA) by weight surgery; attention stays exact over them.

Adjacent KV heads are merged ``G / groups`` at a time by averaging their K and V projection weights
(the mean-pooling conversion of the GQA paper), so each merged head serves the query heads of its
members and the K/V projections and cache shrink by that factor. The planner measures the error
on calibration data; the surgery and the rewrite are in passes/surgery.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from codegen.variants import dense
from codegen.variants.gqa_merge import KERNEL
from codegen.variants.gqa_merge import PROBE as KERNEL_PROBE
from passes.variants import Variant
from passes.variants._grid import modifier_reason

DEFAULTS: dict = {"groups": 1}
PARAMS: dict = {"groups": int}


def applies(site) -> Optional[str]:
    """KV heads can merge when there are at least two (K/V projections are checked by the planner)."""
    if site.num_kv_heads < 2:
        return f"the site has {site.num_kv_heads} KV head(s); nothing to merge"
    return modifier_reason(site, fill=True)


def grid(site) -> list[dict]:
    """Merged head counts to try, fewest first (divisors of the KV heads: a half, a quarter, ...)."""
    g = site.num_kv_heads
    return [{"groups": d} for d in sorted({g // f for f in (8, 4, 2) if g % f == 0 and g // f >= 1})]


def exact(site, params: dict) -> bool:
    """True when nothing is merged."""
    return int(params.get("groups", 0)) >= site.num_kv_heads


def kernel_kv_heads(site, params: dict) -> int:
    """The K/V heads the kernel reads after the surgery (what its spec's GQA ratio is made from)."""
    return max(1, min(int(params.get("groups", site.num_kv_heads)), site.num_kv_heads))


def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the surgery cannot apply."""
    if params.get("groups", 1) < 1:
        raise ValueError(f"gqa_merge: groups must be >= 1, not {params['groups']}")


def _merge_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, g, m, d = x.shape
    return x.reshape(b, groups, g // groups, m, d).mean(2)


def prepare(sp, cands: list, records: list, index: int, say) -> None:
    """Merged KV heads: scored on merged recorded K/V (the average of member heads, as the surgery makes)."""
    for c in cands:
        n = int(c.params["groups"])
        c.inputs = lambda rec, n=n: (rec.q, _merge_heads(rec.k, n), _merge_heads(rec.v, n))
        c.probe = (KERNEL_PROBE, {"groups": n})
        c.score_as = (KERNEL.name, {})


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: grid(site),
    defaults=DEFAULTS, params=PARAMS, check=check_params,
    needs=frozenset({"factored_kv"}), weight_surgery="merge_heads", kv_heads=kernel_kv_heads, prepare=prepare,
    standalone=lambda site, params, g: (kernel_kv_heads(site, params), site.head_dim, site.v_head_dim, []),
    price=lambda site, params, shape: [(dense.KERNEL.name, {}, {**shape, "G": kernel_kv_heads(site, params)},
                                        "online")])
