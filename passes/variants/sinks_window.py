"""``sinks_window``: the first S keys (attention sinks, StreamingLLM) plus a sliding window.

Key j is visible to query i when j < S or |i - j| < W (and j <= i if causal).  The reference
is the blocked sliding window of ``sliding_window`` with the S sink keys concatenated to every
query block's span (a gather copy the cascade counts).
"""
from __future__ import annotations

from typing import Optional

from codegen.variants.sinks_window import KERNEL
from passes.variants import Variant
from passes.variants._grid import modifier_reason, sequence_reason, windows, with_delta

DEFAULTS: dict = {"window": 256, "sinks": 4, "block": 64}
PARAMS: dict = {"window": int, "sinks": int, "block": int, "delta": int}


def applies(site) -> Optional[str]:
    """Sinks + window applies to self-attention over a sequence; returns a reason if not."""
    return sequence_reason(site, cache=True) or modifier_reason(site)


def grid(site) -> list[dict]:
    """Windows to try, narrowest first, each with 4 sink tokens (StreamingLLM)."""
    return with_delta([{"window": w, "sinks": 4} for w in windows(site.kv_len)])


def exact(site, params: dict) -> bool:
    """True when the window alone covers every key."""
    return int(params.get("window", 0)) >= max(site.q_len, site.kv_len)

def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    for k in ("window", "block"):
        if k in params and params[k] < 1:
            raise ValueError(f"sinks_window: {k} must be >= 1, not {params[k]}")
    if params.get("sinks", 0) < 0:
        raise ValueError(f"sinks_window: sinks must be >= 0, not {params['sinks']}")


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: grid(site),
    defaults=DEFAULTS, params=PARAMS, check=check_params,
    draws_band=lambda params: None if int(params.get("sinks", 0) or 0) else int(params.get("window", -1)))
