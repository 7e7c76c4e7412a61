"""``latent``: low-rank K and V (rank R) with the up-projections absorbed.

K ≈ CK·UK and V ≈ CV·UV with CK, CV [B,G,M,R] and UK [G,R,E], UV [G,R,F].  Scores are
(q·UKᵀ)·CKᵀ, so attention runs at head dim R, and UV is applied to the output.  In a rewritten
model the factors come from the K/V projection weights (Palu-style SVD); the reference accepts
them as ``factors`` or, when absent, computes them by an SVD of k and v themselves, per KV head
over all batch rows (so with R >= head dim it is exact).  Causal masks are bottom-right aligned.

Keys rotated after their projection (rotary embeddings, found by ``passes.rotary``) are factored before
the rotation (Palu): the graph fact ``rope`` (the rotation's layout) becomes a parameter, the bases are fitted
on the un-rotated keys, and the op rebuilds K = rope(CK·UK) with the model's cos and sin.
"""
from __future__ import annotations

from typing import Optional

import torch

from codegen import rotary
from codegen.variants.latent import KERNEL
from codegen.variants.latent import PROBE as KERNEL_PROBE
from passes.variants import Variant
from passes.variants._grid import modifier_reason

DEFAULTS: dict = {"rank": 32}
PARAMS: dict = {"rank": int, "rope": str}


def applies(site) -> Optional[str]:
    """Latent applies to sites whose shape allows a rank below the head dim; the planner also checks that
    K and V come from Linear projections it can factor (passes/surgery.py)."""
    if site.head_dim < 8:
        return f"head dim {site.head_dim} is too small to factor"
    return modifier_reason(site)


def grid(site, facts: Optional[dict] = None) -> list[dict]:
    """Ranks to try, lowest first (a fraction of the head dim, rounded to a multiple of 4)."""
    d = site.head_dim
    ranks = sorted({max(4, (d * f) // 4 * 4 // 4) for f in (1, 2, 3)} - {d})
    return [complete({"rank": r}, facts) for r in ranks if r < d]


def complete(params: dict, facts: Optional[dict] = None) -> dict:
    """The rotation's layout from the graph, when the site's keys are rotated after their projection."""
    rope = (facts or {}).get("rope")
    return {**params, "rope": rope} if rope else {k: v for k, v in params.items() if k != "rope"}


def exact(site, params: dict) -> bool:
    """True at full rank."""
    return int(params.get("rank", 0)) >= site.head_dim

def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    if params.get("rank", 1) < 1:
        raise ValueError(f"latent: rank must be >= 1, not {params['rank']}")
    if params.get("rope") not in (None, *rotary.FORMS):
        raise ValueError(f"latent: rope must be one of {rotary.FORMS}, not {params['rope']!r}")


def _factor(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, g, m, d = x.shape
    rows = x.permute(1, 0, 2, 3).reshape(g, b * m, d).to(torch.promote_types(x.dtype, torch.float32))
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    up = vh[:, :rank].to(x.dtype)  # [G,R,D], orthonormal rows
    return torch.matmul(x, up.transpose(-1, -2).unsqueeze(0)), up


def factors(k: torch.Tensor, v: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """(CK, UK, CV, UV) from an SVD of k and v per KV head."""
    ck, uk = _factor(k, rank)
    cv, uv = _factor(v, rank)
    return ck, uk, cv, uv


def attend(q: torch.Tensor, ck: torch.Tensor, uk: torch.Tensor, cv: torch.Tensor, uv: torch.Tensor, *,
           scale: float, causal: bool) -> torch.Tensor:
    """Attention on the latent factors: SDPA at head dim R between the two projections."""
    bsz, h, p, e = q.shape
    g, m = ck.shape[1], ck.shape[2]
    r = h // g
    ql = torch.matmul(q.view(bsz, g, r, p, e), uk.transpose(-1, -2)[None, :, None]).reshape(bsz, h, p, -1)
    mask = None
    if causal and p != m:
        mask = torch.ones(p, m, dtype=torch.bool, device=q.device).tril(diagonal=m - p)
    ol = torch.nn.functional.scaled_dot_product_attention(
        ql, ck, cv, attn_mask=mask, is_causal=causal and p == m, scale=scale, enable_gqa=g != h)
    return torch.matmul(ol.view(bsz, g, r, p, -1), uv[None, :, None]).reshape(bsz, h, p, -1)


def standalone(site, params: dict, g: torch.Generator) -> tuple:
    """K/V arrive at rank R with per-head up-projections."""
    heads, r = site.num_kv_heads, int(params["rank"])
    extra = [torch.randn(heads, r, site.head_dim, generator=g) / r ** 0.5,
             torch.randn(heads, r, site.v_head_dim, generator=g) / r ** 0.5]
    return heads, r, r, extra


def _unrotated(rec, rope: Optional[str]):
    """The record's keys before the rotation (its extra operands are the model's cos and sin)."""
    if not rope:
        return rec.k
    cos, sin = rec.extra
    return rotary.undo(rec.k.float(), cos.float(), sin.float(), rope).to(rec.k.dtype)


def prepare(sp, cands: list, records: list, index: int, say) -> None:
    """Fit each candidate's K/V bases on the calibration records (one SVD per site, sliced by rank); rotated
    keys are un-rotated first, so the bases span the keys the K projection makes."""
    import dataclasses

    from codegen import lowrank
    from passes.surgery import factors, project

    if not records:
        return
    rope = cands[0].params.get("rope")
    plain = [dataclasses.replace(r, k=_unrotated(r, rope)) for r in records] if rope else records
    top = max(int(c.params["rank"]) for c in cands)
    uk_all, uv_all = factors(plain, "k", top), factors(plain, "v", top)
    for c in cands:
        r = int(c.params["rank"])
        uk, uv = uk_all[:, :r].contiguous(), uv_all[:, :r].contiguous()
        key = f"site{index}-rank{r}-{id(sp)}"
        lowrank.PROBES[key] = (uk, uv)
        c.extra = (uk, uv)
        probe = {"probe": key, "rank": r, **({"rope": rope} if rope else {})}
        if rope:  # cos/sin differ per record: each record brings its own
            c.inputs = lambda rec, uk=uk, uv=uv: (rec.q, project(_unrotated(rec, rope), uk), project(rec.v, uv),
                                                  (uk, uv, *rec.extra))
        else:
            c.inputs = lambda rec, uk=uk, uv=uv: (rec.q, project(rec.k, uk), project(rec.v, uv))
        c.probe = (KERNEL_PROBE, probe)


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=grid, complete=complete,
    defaults=DEFAULTS, params=PARAMS, check=check_params, rotary_keys=True,
    needs=frozenset({"factored_kv"}), weight_surgery="low_rank", standalone=standalone,
    prepare=prepare)
