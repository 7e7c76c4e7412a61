"""``strided_window``: groups of ``stride`` queries share the window around the group's centre (GNA).

Applies where a sliding window does: self-attention over a sequence (decode steps read the newest
positions of a KV cache). The planner tries strides of a query block's size against the windows a
sliding window would try; the kernel is ``codegen.variants.strided_window``.
"""
from __future__ import annotations

from typing import Optional

from codegen.variants.strided_window import KERNEL
from passes.variants import Variant
from passes.variants._grid import modifier_reason, sequence_reason, windows

DEFAULTS: dict = {"window": 256, "stride": 16, "block": 64}
PARAMS: dict = {"window": int, "stride": int, "block": int, "delta": int}


def applies(site) -> Optional[str]:
    """A strided window applies to self-attention over a sequence; returns a reason if not."""
    return sequence_reason(site, cache=True) or modifier_reason(site)


def grid(site, facts: Optional[dict] = None) -> list[dict]:
    """Windows wider than a query block, each shared by groups of a block's 64 queries (so every query block
    sees one span of keys). Priced as the sliding window it approximates, it wins a tie only by accuracy."""
    return [{"window": w, "stride": 64} for w in windows(site.kv_len) if w > 64]


def exact(site, params: dict) -> bool:
    """True when every group's window covers every key."""
    return int(params.get("window", 0)) >= max(site.q_len, site.kv_len) + int(params.get("stride", 1))


def check_params(params: dict) -> None:
    """Raise a ValueError naming a parameter the kernel cannot run."""
    for k in ("window", "stride", "block"):
        if k in params and params[k] < 1:
            raise ValueError(f"strided_window: {k} must be >= 1, not {params[k]}")


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=grid, defaults=DEFAULTS, params=PARAMS,
    check=check_params)
