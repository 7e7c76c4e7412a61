"""``sliding_window``: key j visible to query i when |i - j| < W (and j <= i if causal).

Spec: one key interval per query, [i - W + 1, i + W - 1]; queries sit at the end of the keys.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.ops import register_kernel
from codegen.pattern import register_pattern
from codegen.sparse import no_fill, reference_pattern, run_pattern

VARIANT = "sliding_window"


@register_pattern(VARIANT)
def pattern(qpos: torch.Tensor, m: int, p: int, *, window: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """[P,1] key interval of each query: |i - j| < window."""
    if int(window) < 1:
        raise ValueError("sliding_window: window must be >= 1")
    return (qpos - window + 1)[:, None], (qpos + window - 1)[:, None]


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, window: int, **_) -> torch.Tensor:
    """Naive dense attention with the window's element mask."""
    return reference_pattern(VARIANT, {"window": window}, q, k, v, mask, scale, causal, softcap)


@register_kernel(VARIANT)
def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, window: int, block: int = 64) -> torch.Tensor:
    """Sliding-window attention visiting only the key blocks within the window."""
    no_fill(VARIANT, mask, fill)
    return run_pattern(VARIANT, {"window": int(window)}, q, k, v, mask, scale, causal, softcap, int(block))
