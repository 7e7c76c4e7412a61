"""``sinks_window``: the sliding window plus the first S keys for every query (StreamingLLM).

Spec: two key intervals per query, [0, S - 1] and [i - W + 1, i + W - 1] (causal clamps both).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.ops import register_kernel
from codegen.pattern import register_pattern
from codegen.sparse import no_fill, reference_pattern, run_pattern

VARIANT = "sinks_window"


@register_pattern(VARIANT)
def pattern(qpos: torch.Tensor, m: int, p: int, *, window: int, sinks: int, **_
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[P,2] key intervals: the sinks and the window."""
    if int(window) < 1 or int(sinks) < 0:
        raise ValueError("sinks_window: window must be >= 1 and sinks >= 0")
    zeros = torch.zeros_like(qpos)
    lo = torch.stack([zeros, qpos - window + 1], dim=1)
    hi = torch.stack([zeros + sinks - 1, qpos + window - 1], dim=1)
    return lo, hi


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, window: int, sinks: int, **_
              ) -> torch.Tensor:
    """Naive dense attention with the sinks-plus-window element mask."""
    return reference_pattern(VARIANT, {"window": window, "sinks": sinks}, q, k, v, mask, scale, causal, softcap)


@register_kernel(VARIANT)
def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, window: int, sinks: int, block: int = 64) -> torch.Tensor:
    """Sinks + sliding-window attention visiting only the sink and window key blocks."""
    no_fill(VARIANT, mask, fill)
    return run_pattern(VARIANT, {"window": int(window), "sinks": int(sinks)}, q, k, v, mask, scale, causal,
                       softcap, int(block))
