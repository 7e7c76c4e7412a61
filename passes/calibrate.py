"""Calibration: record each site's q, k, v, mask and exact output once, then score candidates from the records.

The captured graph is run with every site rewritten to exact ``dense`` while ``codegen.ops.recording``
is active, so the i-th recorded kernel call is the i-th attention op in graph order. A candidate's
error at a site is measured on those records alone (its kernel on the recorded q, k, v against the
recorded output): no whole-model run per candidate. Memory stays bounded: only as many samples are
kept per site as fit in ``max_bytes``, and scores are computed one record at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

import codegen
from codegen.ops import recording
from passes.masks import MASKED_BELOW

logger = logging.getLogger(__name__)


@dataclass
class SiteRecord:
    """One recorded call of a site's attention (canonical layouts, as the op receives them)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    out: torch.Tensor
    scale: float
    causal: bool
    softcap: float
    fill: Optional[float]
    rows: Optional[torch.Tensor]  # bool [B, P]: query rows that mean something (None = all)

    @property
    def nbytes(self) -> int:
        """Bytes held by the record's tensors."""
        ts = [self.q, self.k, self.v, self.out] + ([self.mask] if self.mask is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _valid_rows(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Query rows at non-padded positions, read from a key-padding mask of a self-attention."""
    if mask is None or q.shape[-2] != k.shape[-2] or mask.dim() != 4 or mask.shape[-2] != 1:
        return None
    keep = mask if mask.dtype == torch.bool else mask > MASKED_BELOW
    keep = keep[:, :, 0, :].all(dim=1)  # [B', M]
    if bool(keep.all()):
        return None
    return keep.expand(q.shape[0], keep.shape[-1])


def record_sites(
    run_model: Callable[[dict], Any],
    samples: Sequence[dict],
    n_sites: int,
    max_bytes: int = 1 << 30,
) -> list[list[SiteRecord]]:
    """Run ``run_model`` (a dense-rewritten program) on each sample; returns records per site.

    Samples beyond the memory budget are run but not kept (each site keeps the same samples).
    """
    per_site: list[list[SiteRecord]] = [[] for _ in range(n_sites)]
    held = 0
    for i, kw in enumerate(samples):
        with torch.no_grad(), recording() as calls:
            run_model(kw)
        if len(calls) != n_sites:
            raise RuntimeError(f"calibration recorded {len(calls)} attention calls for {n_sites} sites; the "
                               "program calls some site more or less than once per forward")
        recs = []
        for c in calls:
            recs.append(SiteRecord(
                q=c["q"].detach(), k=c["k"].detach(), v=c["v"].detach(),
                mask=None if c["mask"] is None else c["mask"].detach(), out=c["out"].detach(),
                scale=c["scale"], causal=c["causal"], softcap=c["softcap"], fill=c["fill"],
                rows=_valid_rows(c["q"], c["k"], c["mask"]),
            ))
        size = sum(r.nbytes for r in recs)
        if held and held + size > max_bytes:
            logger.info("calibration keeps %d of %d samples per site (memory budget %d MB)", i, len(samples),
                        max_bytes >> 20)
            break
        held += size
        for s, r in enumerate(recs):
            per_site[s].append(r)
    return per_site


def site_error(records: Sequence[SiteRecord], variant: str, params: dict,
               extra: Sequence[torch.Tensor] = (), inputs: Optional[Callable] = None) -> float:
    """Relative L2 error of ``variant`` at a site over its records' meaningful query rows.

    ``inputs(record) -> (q, k, v)`` replaces the recorded operands (latent: the low-rank K/V).
    """
    num = den = 0.0
    for r in records:
        q, k, v = inputs(r) if inputs is not None else (r.q, r.k, r.v)
        with torch.no_grad():
            out = codegen.run(variant, q, k, v, r.mask, r.scale, r.causal, extra=extra, softcap=r.softcap,
                              fill=r.fill, **params)
        diff = (out.double() - r.out.double()).pow(2).sum(dim=(1, 3))  # [B, P]
        ref = r.out.double().pow(2).sum(dim=(1, 3))
        if r.rows is not None:
            diff, ref = diff[r.rows], ref[r.rows]
        if not bool(torch.isfinite(diff).all()):
            return float("inf")
        num += float(diff.sum())
        den += float(ref.sum())
    return (num / den) ** 0.5 if den > 0 else num ** 0.5
