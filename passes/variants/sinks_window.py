"""``sinks_window``: the first S keys (attention sinks, StreamingLLM) plus a sliding window.

Key j is visible to query i when j < S or |i - j| < W (and j <= i if causal).  The reference
is the blocked sliding window of ``sliding_window`` with the S sink keys concatenated to every
query block's span (a gather copy the cascade counts).
"""
from __future__ import annotations

from typing import Optional

import torch

from passes.variants.sliding_window import local_attention

CASCADE = "sinks_window"
DEFAULTS: dict = {"window": 256, "sinks": 4, "block": 64}


def applies(site) -> Optional[str]:
    """Sinks + window applies to self-attention over a sequence; returns a reason if not."""
    if getattr(site, "is_cross", False):
        return "cross-attention has no sequence order between queries and keys"
    return None


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
              window: int = DEFAULTS["window"], sinks: int = DEFAULTS["sinks"],
              block: int = DEFAULTS["block"]) -> torch.Tensor:
    """Sinks + window attention, q [B,H,P,E], k [B,G,M,E], v [B,G,M,F] -> [B,H,P,F]."""
    return local_attention(q, k, v, scale=scale, causal=causal, window=window, sinks=sinks, block=block)
