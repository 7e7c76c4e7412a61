"""Kernel for the ``dense`` variant: exact attention, fused by PyTorch's SDPA on CPU and CUDA."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from codegen.ops import register_kernel


@register_kernel("dense")
def dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Exact softmax attention with an online-softmax fused kernel where PyTorch has one."""
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )
