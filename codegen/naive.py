"""The obviously-right math every fast path is tested against: dense softmax attention with a mask."""
from __future__ import annotations

from typing import Optional

import torch

# An additive mask value at or below this hides its score exactly as -inf does for any row with a
# visible key: exp(-1e4 + s - max) underflows to 0 (finfo.min, -1e9 and old BERT's -10000 all qualify).
HIDDEN_BELOW = -1e4


def as4d(mask: torch.Tensor) -> torch.Tensor:
    """View a broadcastable op mask as 4-D [B|1, H|1, P|1, M|1]."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask


def visible_of(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of an op mask: True where a score gets through (bool True, or additive > ``HIDDEN_BELOW``)."""
    return mask if mask.dtype == torch.bool else mask > HIDDEN_BELOW


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    scale: float, *, visible: Optional[torch.Tensor] = None, softcap: float = 0.0,
                    fill: Optional[float] = None, compute: torch.dtype = torch.float64) -> torch.Tensor:
    """Three-pass softmax attention in ``compute`` precision (float64: the references); ``visible`` [.., P, M]
    is the variant's pattern.

    Rows where no key is visible give 0 (as FlexAttention does), not NaN.
    """
    h, g = q.shape[1], k.shape[1]
    k = k.to(compute).repeat_interleave(h // g, dim=1)
    v = v.to(compute).repeat_interleave(h // g, dim=1)
    s = (q.to(compute) @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf") if fill is None else float(fill))
        else:
            s = s + mask.to(compute)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).to(q.dtype)


def causal_top_left(p: int, m: int, device=None) -> torch.Tensor:
    """[P, M] bool: key j visible to query i when j <= i (the dense op's causal alignment)."""
    return torch.ones(p, m, dtype=torch.bool, device=device).tril()
