"""Calibration: record each site's q, k, v, mask and exact output once, then score candidates from the records.

The captured graph, with every site rewritten to exact ``dense``, is run in an ``fx.Interpreter`` that
keeps each attention op's operands and output under its node. A candidate's
error at a site is measured on those records alone (its kernel on the recorded q, k, v against the
recorded output): no whole-model run per candidate. Memory stays bounded: only as many samples are
kept per site as fit in ``max_bytes``, and scores are computed one record at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

import codegen
from passes.masks import MASKED_BELOW
from passes.program_inputs import flat_inputs

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
    extra: tuple = ()  # the op's extra operands as recorded (a rotary site's cos and sin)

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


class _Recorder(fx.Interpreter):
    """Runs a graph node by node and keeps each wanted attention op's operands and output, by node name."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, int]):
        super().__init__(gm)
        self.wanted = wanted
        self.calls: dict[int, dict] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        site = self.wanted.get(n.name)
        if site is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)  # the operands are still in the environment here
            names = [a.name for a in n.target._schema.arguments]
            got = {**{a.name: a.default_value for a in n.target._schema.arguments if a.has_default_value()},
                   **dict(zip(names, args)), **kwargs}
            q = got["q"]
            self.calls[site] = {**got, "out": out,
                                "scale": float(got["scale"] if got["scale"] is not None else q.shape[-1] ** -0.5)}
        return out


def _runner(ep: torch.export.ExportedProgram) -> tuple[fx.GraphModule, Callable[[dict], list]]:
    """The graph to interpret and how to turn a sample into its arguments (the lifted graph where it binds)."""
    bind = flat_inputs(ep)
    if bind is not None:
        return ep.graph_module, bind
    module, in_spec = ep.module(), ep.call_spec.in_spec  # buffers it mutates live on this copy
    return module, lambda kw: fx_pytree.tree_flatten_spec(((), kw), in_spec)


def record_sites(
    ep: torch.export.ExportedProgram,
    samples: Sequence[dict],
    nodes: Sequence[fx.Node],
    max_bytes: int = 1 << 30,
) -> list[list[SiteRecord]]:
    """Run ``ep`` (a dense-rewritten program) on each sample; returns the records of each op node in ``nodes``.

    The graph runs in an ``fx.Interpreter`` that keeps each op node's operands and output under that node,
    so records never depend on the order ops run in. Samples beyond the memory budget are run but not kept
    (each site keeps the same samples).
    """
    gm, bind = _runner(ep)
    wanted = {n.name: i for i, n in enumerate(nodes)}
    per_site: list[list[SiteRecord]] = [[] for _ in nodes]
    held = 0
    for i, kw in enumerate(samples):
        rec = _Recorder(gm, wanted)
        with torch.no_grad():
            rec.run(*bind(kw))
        missing = sorted(set(range(len(nodes))) - set(rec.calls))
        if missing:
            raise RuntimeError(f"calibration recorded no call of attention op(s) {[nodes[s].name for s in missing]}")
        recs = []
        for s in range(len(nodes)):
            c = rec.calls[s]
            recs.append(SiteRecord(
                q=c["q"].detach(), k=c["k"].detach(), v=c["v"].detach(),
                mask=None if c["mask"] is None else c["mask"].detach(), out=c["out"].detach(),
                scale=c["scale"], causal=bool(c["causal"]), softcap=float(c["softcap"]), fill=c["fill"],
                rows=_valid_rows(c["q"], c["k"], c["mask"]),
                extra=tuple(t.detach() for t in c.get("extra") or ()),
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

    ``inputs(record) -> (q, k, v[, extra])`` replaces the recorded operands (latent: the low-rank K/V; with
    rotary keys also the record's own extra operands).
    """
    num = den = 0.0
    for r in records:
        got = inputs(r) if inputs is not None else (r.q, r.k, r.v)
        q, k, v = got[:3]
        ex = got[3] if len(got) > 3 else extra
        with torch.no_grad():
            out = codegen.run(variant, q, k, v, r.mask, r.scale, r.causal, extra=ex, softcap=r.softcap,
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
