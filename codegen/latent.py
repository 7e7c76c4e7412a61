"""``latent``: attention over low-rank K/V with the up-projections fused.

k = CK [B,G,M,R], v = CV [B,G,M,R], ``extra = [uk [G,R,E], uv [G,R,F]]``:
scores = scale·(q·ukᵀ)·CKᵀ and output = (softmax·CV)·uv, i.e. exact attention at head dim R
between the two projections.  Masks, softcap, fill and ``causal`` (top-left, as the dense op)
behave as in ``dense``, which runs the rank-R attention.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from codegen.dense import dense, reference as dense_reference
from codegen.ops import register_kernel

VARIANT = "latent"


def _factors(extra: Sequence[torch.Tensor], g: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(extra) != 2:
        raise ValueError("latent: extra must be [uk [G,R,E], uv [G,R,F]]")
    uk, uv = extra
    if uk.shape[0] != g or uk.shape[1] != r or uv.shape[:2] != uk.shape[:2]:
        raise ValueError(f"latent: uk {tuple(uk.shape)} / uv {tuple(uv.shape)} do not match G={g}, R={r}")
    return uk, uv


def reference(q, ck, cv, mask, scale, causal, *, extra: Sequence[torch.Tensor], softcap: float = 0.0,
              fill: Optional[float] = None, **_) -> torch.Tensor:
    """Rebuild K = CK·UK and V = CV·UV, then plain dense attention (for tests)."""
    uk, uv = _factors(extra, ck.shape[1], ck.shape[-1])
    k = ck.double() @ uk.double()[None]
    v = cv.double() @ uv.double()[None]
    return dense_reference(q.double(), k, v, mask, scale, causal, softcap=softcap, fill=fill).to(q.dtype)


@register_kernel(VARIANT)
def kernel(q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, rank: Optional[int] = None) -> torch.Tensor:
    """Rank-R attention: project q down by uk, attend over CK/CV, project the output up by uv."""
    bsz, h, p, e = q.shape
    g, m, r = ck.shape[1], ck.shape[2], ck.shape[-1]
    uk, uv = _factors(extra, g, r)
    if rank is not None and int(rank) != r:
        raise ValueError(f"latent: rank={rank} but the factors have rank {r}")
    if q.is_cuda or q.device.type == "cpu" and os.environ.get("REWRITER_TRITON") == "force":
        from codegen.triton import maybe_run  # late: Triton is optional; up-projections fused in the kernel
        out = maybe_run(VARIANT, q, ck, cv, mask, scale, causal, softcap, fill, {"rank": r}, extra=[uk, uv])
        if out is not None:
            return out
    rep = h // g
    ql = torch.matmul(q.view(bsz, g, rep, p, e), uk.to(q.dtype).transpose(-1, -2)[None, :, None])
    ol = dense(ql.reshape(bsz, h, p, r), ck, cv, mask, scale, causal, softcap=softcap, fill=fill)
    out = torch.matmul(ol.view(bsz, g, rep, p, r), uv.to(q.dtype)[None, :, None])
    return out.reshape(bsz, h, p, -1)
