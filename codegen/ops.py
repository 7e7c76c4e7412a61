"""The one custom op a rewritten attention site calls: ``torch.ops.rewriter.attention``.

The op carries the variant name and its parameters (JSON) so an exported graph keeps the
plan; the kernel for each variant is looked up at run time from ``KERNELS``.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

Kernel = Callable[..., torch.Tensor]
KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str) -> Callable[[Kernel], Kernel]:
    """Register ``fn`` as the CPU/CUDA kernel that runs variant ``name``."""

    def deco(fn: Kernel) -> Kernel:
        KERNELS[name] = fn
        return fn

    return deco


@torch.library.custom_op("rewriter::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    variant: str,
    params: str,
) -> torch.Tensor:
    """Attention over q [B,H,P,E], k [B,G,M,E], v [B,G,M,F] -> [B,H,P,F] by ``variant``.

    ``mask`` broadcasts to [B,H,P,M]: bool (True = attend) or additive float.
    ``causal`` is top-left aligned (key j visible to query i when j <= i).
    """
    try:
        kernel = KERNELS[variant]
    except KeyError:
        raise ValueError(
            f"rewriter::attention has no kernel for variant {variant!r}; known: {sorted(KERNELS)}. "
            "Import the package that defines it (import rewriter) before running the graph."
        ) from None
    # The op's contract is a contiguous [B,H,P,F] result: the fake kernel promises it to compilers.
    return kernel(q, k, v, mask, scale, causal, **json.loads(params or "{}")).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, causal, variant, params):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# Import kernels after the op exists so each module can register itself.
from codegen import dense as _dense  # noqa: E402,F401
