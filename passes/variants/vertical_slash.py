"""``vertical_slash``: per head and per input, keep the key columns and diagonals the last queries attend to.

Applies to self-attention over a sequence whose only mask is causal (or none): the estimate reads the
last queries' scores against every key, which a padding or bias mask would have to take part in.
The planner tries kept sets of a few percent to a third of the keys, split between vertical columns
and slash bands of one block each; the kernel is ``codegen.variants.vertical_slash``.
"""
from __future__ import annotations

from typing import Optional

from codegen.variants.vertical_slash import KERNEL
from passes.variants import Variant
from passes.variants._grid import modifier_reason, sequence_reason

DEFAULTS: dict = {"vertical": 512, "slash": 8, "block": 64, "sinks": 1, "window": 128}
# measured (bench/kernels.py, about 10% of the keys kept): 1.20x SDPA at 4096 keys, 1.45x at 16384; the cost
# model, pricing it with dense's factor, is optimistic below that (2.8x predicted at 2048)
MIN_KEYS = 4096
PARAMS: dict = {"vertical": int, "slash": int, "last_q": int, "block": int, "sinks": int, "window": int}


def _block(site) -> int:
    return 64 if site.kv_len >= 2048 else 32 if site.kv_len >= 512 else 16


def applies(site) -> Optional[str]:
    """Self-attention over a sequence with no mask but causal; returns a reason if not."""
    why = sequence_reason(site, cache=True) or modifier_reason(site, masks=("none", "causal"))
    if why:
        return why
    if site.kv_len < MIN_KEYS:
        return (f"{site.kv_len} keys are too few: below {MIN_KEYS} the estimate and the gathers cost more than "
                "the keys they skip")
    return None


def grid(site, facts: Optional[dict] = None) -> list[dict]:
    """Kept sets of 4% to 32% of the keys, half columns and half bands, estimated from the last 64 queries."""
    n, blk = site.kv_len, _block(site)
    last_q = max(1, min(64, site.q_len))
    out = []
    for share in (0.04, 0.08, 0.16, 0.32):
        kept = share * n
        out.append({"vertical": max(1, int(kept / 2)), "slash": max(1, round(kept / 2 / blk)), "last_q": last_q,
                    "block": blk, "window": 2 * blk})
    return out


def exact(site, params: dict) -> bool:
    """True when every key column is kept."""
    return int(params.get("vertical", 0)) + int(params.get("sinks", 1)) >= site.kv_len


def fits(site, params: dict) -> Optional[str]:
    """Why a forced choice cannot run at ``site`` (the estimate needs ``last_q`` queries), or None."""
    last_q = params.get("last_q")
    if last_q is not None and site.q_len > 0 and int(last_q) > site.q_len:
        return (f"last_q={last_q} is larger than the site's {site.q_len} queries; pass last_q <= {site.q_len} "
                "(the estimate reads the last last_q queries)")
    return None


def check_params(params: dict) -> None:
    """Raise a ValueError naming a parameter the kernel cannot run."""
    for k, low in (("vertical", 0), ("slash", 0), ("last_q", 1), ("block", 1), ("sinks", 0), ("window", 0)):
        if k in params and params[k] < low:
            raise ValueError(f"vertical_slash: {k} must be >= {low}, not {params[k]}")


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=grid, defaults=DEFAULTS, params=PARAMS,
    check=check_params, fits=fits)
