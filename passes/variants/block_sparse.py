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

A second estimator (``tau > 0``, XAttention) keeps tiles by their strided-antidiagonal attention mass until a
share ``tau`` is covered, per head and per input.  Its work depends on the input, so the grid's choices carry
``keep=0`` ("cap to be measured") and ``prepare`` measures on the calibration records how many blocks the
rows need at that ``tau``: the cap becomes ``keep``, the price follows it, and the site error is measured with
the cap in place.  The planner then weighs both estimators by price and measured error.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from codegen.variants.block_sparse import KERNEL
from passes.variants import Variant
from passes.variants._grid import modifier_reason, with_delta

DEFAULTS: dict = {"block": 64}
PARAMS: dict = {"keep": float, "block": int, "tau": float, "stride": int, "delta": int}
TAUS = (0.8, 0.9, 0.95)
# the cap is the kept share this quantile of the records' query blocks needs (the rest are cut at it)
CAP_QUANTILE = 0.9


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
    blk = _block(site)
    pooled = [{"keep": keep, "block": blk} for keep in (0.125, 0.25, 0.5, 0.75)]
    mass = [{"keep": 0.0, "tau": tau, "stride": min(8, blk), "block": blk} for tau in TAUS]
    return with_delta(pooled) + mass


def complete(params: dict, facts: Optional[dict] = None) -> dict:
    """A forced choice's cap: a quarter of the blocks for top-k, none (every block) under the mass estimator."""
    tau = float(params.get("tau", 0.0))
    if "keep" not in params or (tau > 0 and float(params["keep"]) == 0):
        return {**params, "keep": 1.0 if tau > 0 else 0.25}
    return params


def _cap(records: list, params: dict) -> float:
    """The kept share of key blocks CAP_QUANTILE of the records' query blocks need at the choice's tau."""
    from codegen.variants.block_sparse import select_blocks

    needs = []
    for rec in records:
        blk = int(params["block"])
        chosen = select_blocks(rec.q, rec.k, rec.causal, 1.0, blk, rec.mask, tau=float(params["tau"]),
                               stride=int(params.get("stride", 8)), scale=rec.scale)
        needs.append(chosen.float().sum(-1).flatten() / chosen.shape[-1])
    share = float(torch.quantile(torch.cat(needs), CAP_QUANTILE))
    nk = max(1, math.ceil(records[0].k.shape[2] / int(params["block"])))
    return min(1.0, math.ceil(share * nk - 1e-9) / nk)


def prepare(sp, cands: list, records: list, index: int, say) -> None:
    """Measure the mass estimator's cap on the calibration records (no records: the choice cannot be priced)."""
    for c in [c for c in cands if float(c.params.get("tau", 0)) > 0 and float(c.params.get("keep", 1)) == 0]:
        if not records:
            sp.options.remove(c)
            sp.refusals.append(f"{c.variant}(tau={c.params['tau']}): its work depends on the input; calibration "
                               "measures it")
            continue
        c.params = {**c.params, "keep": _cap(records, c.params)}
        c.exact = exact(sp.site, c.params)


def exact(site, params: dict) -> bool:
    """True when every key block is kept (by top-k: the mass estimator may drop blocks even uncapped)."""
    return float(params.get("keep", 0)) >= 1.0 and float(params.get("tau", 0)) == 0

def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    tau = params.get("tau", 0.0)
    if not 0 <= tau <= 1:
        raise ValueError(f"block_sparse: tau is the share of estimated attention mass kept, in [0, 1], not {tau}")
    if "keep" in params and not (0 < params["keep"] <= 1 or tau > 0 and params["keep"] == 0):
        raise ValueError(f"block_sparse: keep is the kept fraction of key blocks, in (0, 1], not {params['keep']}")
    if params.get("stride", 1) < 1:
        raise ValueError(f"block_sparse: stride must be >= 1, not {params['stride']}")
    if params.get("block", 1) < 1:
        raise ValueError(f"block_sparse: block must be >= 1, not {params['block']}")


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: grid(site),
    defaults=DEFAULTS, params=PARAMS, check=check_params, complete=complete, prepare=prepare)
