"""``dense``: exact softmax attention; the baseline every other variant is measured against."""
from __future__ import annotations

from typing import Optional

import torch

CASCADE = "dense"
DEFAULTS: dict = {}
PARAMS: dict = {}


def applies(site) -> Optional[str]:
    """Dense applies to every site; returns None (no reason to refuse)."""
    return None


def exact(site, params: dict) -> bool:
    """Dense is the original math: always exact."""
    return True


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain three-pass softmax attention, GQA by repeating k/v heads."""
    rep = q.shape[1] // k.shape[1]
    if rep != 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        p_len, m_len = s.shape[-2:]
        keep = torch.ones(p_len, m_len, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return (s.softmax(-1) @ v.float()).to(q.dtype)
