"""Shared plumbing of the interval-pattern variants: block map, dispatch to a lowering, reference."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import torch

from codegen.cpu_blocked import blocked_attention
from codegen.naive import naive_attention
from codegen.pattern import BlockMap, cached_block_map, intervals, visible

logger = logging.getLogger(__name__)


def freeze_params(params: Mapping[str, Any]) -> tuple:
    """Hashable, sorted parameter items (lists become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def no_fill(variant: str, mask: Optional[torch.Tensor], fill: Optional[float]) -> None:
    """Refuse a finite bool-mask fill, which only the dense kernel implements."""
    if fill is not None and mask is not None and mask.dtype == torch.bool:
        raise ValueError(f"{variant}: a finite mask fill is only supported by the dense kernel")


def run_pattern(name: str, params: Mapping[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor], scale: float, causal: bool, softcap: float,
                block: int) -> torch.Tensor:
    """Run registered pattern ``name`` through the fastest available lowering (Triton on CUDA)."""
    if q.is_cuda or q.device.type == "cpu" and os.environ.get("REWRITER_TRITON") == "force":
        from codegen.triton import maybe_run  # late: Triton is optional
        out = maybe_run(name, q, k, v, mask, scale, causal, softcap, None, {**params, "block": block})
        if out is not None:
            return out
    p, m = q.shape[2], k.shape[2]
    bm, lo, hi = cached_block_map(name, freeze_params(params), p, m, bool(causal), block, block)
    return run_block_map(q, k, v, mask, scale, softcap, bm, lo, hi)


def run_block_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float, softcap: float, bm: BlockMap, lo: torch.Tensor, hi: torch.Tensor
                  ) -> torch.Tensor:
    """Attention over a block map: the compiled CPU kernel where it applies, else gathered SDPA."""
    if q.device.type != "cpu":
        dev = q.device
        bm = BlockMap(bm.block_q, bm.block_k, bm.num.to(dev), bm.idx.to(dev), bm.full.to(dev))
        lo, hi = lo.to(dev), hi.to(dev)
    from codegen import cpu_kernel  # late: the C++ build is optional and lazy
    out = cpu_kernel.try_run(q, k, v, mask, scale, softcap, bm, lo, hi)
    if out is not None:
        return out
    return blocked_attention(q, k, v, mask, scale, softcap, bm, lo, hi)


def reference_pattern(name: str, params: Mapping[str, Any], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, mask: Optional[torch.Tensor], scale: float, causal: bool,
                      softcap: float = 0.0) -> torch.Tensor:
    """Naive dense attention with the pattern's element mask (for tests)."""
    lo, hi = intervals(name, freeze_params(params), q.shape[2], k.shape[2], bool(causal))
    return naive_attention(q, k, v, mask, scale, visible=visible(lo, hi, k.shape[2]), softcap=softcap)
