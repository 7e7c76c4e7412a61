"""``block_sparse``: per query block, attend only to the top-k key blocks by pooled scores.

Queries and keys are cut into blocks of ``block`` tokens; mean-pooled q and k give a block
score matrix (a cheap estimate, as MInference/SeerAttention do); each query block keeps
``ceil(keep * n_key_blocks)`` key blocks (``keep`` is the kept fraction of *all* key blocks,
so every query block does the same work), always including the blocks holding its own
positions.  Only the selected blocks are gathered and computed.  Under ``causal`` blocks that
lie wholly in the future are never chosen ahead of visible ones, and keys after the query
(bottom-right aligned: query i is at position M - P + i) are masked.  The kernel's selection also
reads the op mask (``codegen.variants.block_sparse``): blocks the padding hides wholly are never kept, so
on padded batches the price (``keep`` of all key blocks) is an upper bound of the work done.
"""
from __future__ import annotations

import math
from typing import Optional

from codegen.variants.block_sparse import KERNEL
from passes.variants import Variant
from passes.variants._grid import modifier_reason, with_delta

DEFAULTS: dict = {"block": 64, "keep": 0.25}
PARAMS: dict = {"keep": float, "block": int, "delta": int}


def _block(site) -> int:
    return 64 if site.kv_len >= 1024 else 32 if site.kv_len >= 256 else 16


def applies(site) -> Optional[str]:
    """Block-sparse applies when the keys span several blocks; returns a reason if not."""
    if site.kv_len < 0:
        return "the key length is not known"
    if math.ceil(site.kv_len / _block(site)) < 4:
        return f"{site.kv_len} keys make fewer than 4 blocks of {_block(site)}"
    return modifier_reason(site)


def grid(site) -> list[dict]:
    """Kept fractions of key blocks to try, sparsest first."""
    return with_delta([{"keep": keep, "block": _block(site)} for keep in (0.125, 0.25, 0.5, 0.75)])


def exact(site, params: dict) -> bool:
    """True when every key block is kept."""
    return float(params.get("keep", 0)) >= 1.0

def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    if "keep" in params and not 0 < params["keep"] <= 1:
        raise ValueError(f"block_sparse: keep is the kept fraction of key blocks, in (0, 1], not {params['keep']}")
    if params.get("block", 1) < 1:
        raise ValueError(f"block_sparse: block must be >= 1, not {params['block']}")


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: grid(site),
    defaults=DEFAULTS, params=PARAMS, check=check_params)
