"""``sliding_window``: key j is visible to query i when |i - j| < W (and j <= i if causal).

The reference computes by query blocks of ``block`` rows: each block reads only its span of
``block + W - 1`` keys (``block + 2W - 2`` if not causal) through an overlapping strided view
of K and V, so a window of W touches about P·(W + block) keys, never a dense P·M.  Queries sit
at the end of the keys (query i is at absolute position M - P + i), so decode sees the last W.
"""
from __future__ import annotations

from typing import Optional

from codegen.variants.sliding_window import KERNEL
from passes.variants import Variant
from passes.variants._grid import modifier_reason, sequence_reason, windows, with_delta

DEFAULTS: dict = {"window": 256, "block": 64}
PARAMS: dict = {"window": int, "block": int, "delta": int}


def applies(site) -> Optional[str]:
    """Sliding window applies to self-attention over a sequence; returns a reason if not."""
    return sequence_reason(site, cache=True) or modifier_reason(site)


def grid(site) -> list[dict]:
    """Windows to try (each also with a Delta correction): the site's own window alone when it has one (exact)."""
    native = getattr(site, "window", None)
    if native:
        return [{"window": int(native)}]
    return with_delta([{"window": w} for w in windows(site.kv_len)])


def exact(site, params: dict) -> bool:
    """True when the window reproduces the site exactly (its own band, or a window covering every key)."""
    native = getattr(site, "window", None)
    w = int(params.get("window", 0))
    return (native is not None and w == native) or w >= max(site.q_len, site.kv_len)

def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    for k in ("window", "block"):
        if k in params and params[k] < 1:
            raise ValueError(f"sliding_window: {k} must be >= 1, not {params[k]}")


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: grid(site),
    defaults=DEFAULTS, params=PARAMS, check=check_params,
    draws_band=lambda params: int(params.get("window", -1)))
