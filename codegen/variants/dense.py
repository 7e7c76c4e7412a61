"""Kernel for the ``dense`` variant: exact attention, fused by PyTorch's SDPA on CPU and CUDA."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from codegen.naive import causal_top_left, naive_attention
from codegen.pattern import EVERY_KEY
from codegen.registry import KernelVariant, TritonKernel, register
from cost_model import cascades


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
              causal: bool, *, softcap: float = 0.0, fill: Optional[float] = None, **_) -> torch.Tensor:
    """The naive float64 reference: three-pass softmax attention with every modifier of the op's contract."""
    vis = causal_top_left(q.shape[2], k.shape[2], q.device) if causal else None
    return naive_attention(q, k, v, mask, scale, visible=vis, softcap=softcap, fill=fill)


def _modified(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
              causal: bool, *, softcap: float = 0.0, fill: Optional[float] = None) -> torch.Tensor:
    """Three-pass softmax attention in float32 with what SDPA does not take (soft-capping, a finite fill)."""
    vis = causal_top_left(q.shape[2], k.shape[2], q.device) if causal else None
    return naive_attention(q, k, v, mask, scale, visible=vis, softcap=softcap, fill=fill, compute=torch.float32)


def _triton_forced() -> bool:
    """Tests may route CPU tensors through the Triton interpreter (REWRITER_TRITON=force)."""
    return os.environ.get("REWRITER_TRITON") == "force"


def dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    *,
    extra: Sequence[torch.Tensor] = (),
    softcap: float = 0.0,
    fill: Optional[float] = None,
) -> torch.Tensor:
    """Exact softmax attention: the generated Triton kernel on CUDA, else SDPA (or the reference)."""
    if q.is_cuda or q.device.type == "cpu" and _triton_forced():
        from codegen.triton import maybe_run  # late: Triton is optional
        out = maybe_run(KERNEL.name, q, k, v, mask, scale, causal, softcap, fill)
        if out is not None:
            return out
    if softcap > 0 or (fill is not None and mask is not None and mask.dtype == torch.bool):
        return _modified(q, k, v, mask, scale, causal, softcap=softcap, fill=fill)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if causal and mask is not None:  # SDPA refuses both: fold the (top-left) causal mask into the mask
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


KERNEL = register(KernelVariant(
    name="dense", kernel=dense, reference=reference, spans=lambda **_: [EVERY_KEY],
    supports=frozenset({"softcap", "fill", "mask", "gqa"}), exact_always=True, top_left=True,
    triton=TritonKernel("ranges"), timing=lambda n: {}, cascade=cascades.dense))
