"""Fidelity corrections applied on top of an approximate kernel's output.

Delta Attention (training-free): exact attention is computed for every ``stride``-th query only,
and the difference between it and the approximate output at that query is added to the
approximate output of the ``stride`` queries it stands for (itself and the ones after it). The
extra cost is dense attention for P/stride queries.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from codegen.variants.dense import dense

# Parameters that name a correction applied on top of a kernel's output by the op (PyTorch ops), not
# by the kernel: a kernel's spec, source and hash never include them.
CORRECTIONS = frozenset({"delta"})


def split_corrections(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(the kernel's own parameters, the corrections the op applies after it) of a variant's ``params``."""
    kernel = {k: v for k, v in params.items() if k not in CORRECTIONS}
    fixes = {k: v for k, v in params.items() if k in CORRECTIONS and v}
    return kernel, fixes


def _rows_mask(mask: Optional[torch.Tensor], rows: torch.Tensor, p: int, m: int, causal: bool,
               device: torch.device) -> Optional[torch.Tensor]:
    """The mask restricted to query ``rows``, with causality (queries at the end of the keys) folded in."""
    sub = None
    if mask is not None:
        sub = mask.index_select(-2, rows) if mask.shape[-2] == p else mask
    if not causal:
        return sub
    keep = torch.arange(m, device=device)[None, :] <= (rows + (m - p))[:, None]  # [P', M]
    if sub is None:
        return keep
    if sub.dtype == torch.bool:
        return sub & keep
    return sub + torch.zeros(keep.shape, dtype=sub.dtype, device=device).masked_fill(~keep, float("-inf"))


def delta_correct(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: Optional[torch.Tensor], scale: float, causal: bool, stride: int,
                  softcap: float = 0.0) -> torch.Tensor:
    """``out`` plus, for each run of ``stride`` queries, the exact-minus-approximate gap at its first query."""
    p, m = q.shape[-2], k.shape[-2]
    rows = torch.arange(0, p, stride, device=q.device)
    exact = dense(q.index_select(-2, rows), k, v, _rows_mask(mask, rows, p, m, causal, q.device), scale, False,
                  softcap=softcap)
    gap = exact - out.index_select(-2, rows)
    return out + gap.repeat_interleave(stride, dim=-2)[..., :p, :]
