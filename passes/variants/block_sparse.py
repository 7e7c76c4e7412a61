"""``block_sparse``: per query block, attend only to the top-k key blocks by pooled scores.

Queries and keys are cut into blocks of ``block`` tokens; mean-pooled q and k give a block
score matrix (a cheap estimate, as MInference/SeerAttention do); each query block keeps
``ceil(keep * n_key_blocks)`` key blocks (``keep`` is the kept fraction of *all* key blocks,
so every query block does the same work), always including the blocks holding its own
positions.  Only the selected blocks are gathered and computed.  Under ``causal`` blocks that
lie wholly in the future are never chosen ahead of visible ones, and keys after the query
(bottom-right aligned: query i is at position M - P + i) are masked.  The kernel's selection also
reads the op mask (``codegen.block_sparse``): blocks the padding hides wholly are never kept, so
on padded batches the price (``keep`` of all key blocks) is an upper bound of the work done.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from passes.variants._grid import modifier_reason, with_delta

CASCADE = "block_sparse"
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


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
              block: int = DEFAULTS["block"], keep: float = DEFAULTS["keep"]) -> torch.Tensor:
    """Block-sparse top-k attention, q [B,H,P,E], k [B,G,M,E], v [B,G,M,F] -> [B,H,P,F]."""
    bsz, h, p, e = q.shape
    g, m, f = k.shape[1], k.shape[2], v.shape[-1]
    r = h // g
    if not 0 < keep <= 1:
        raise ValueError("keep must be in (0, 1]")
    off = m - p
    nq, nk = math.ceil(p / block), math.ceil(m / block)
    nsel = min(nk, max(1, math.ceil(keep * nk)))
    dev = q.device
    qp = torch.nn.functional.pad(q * scale, (0, 0, 0, nq * block - p)).view(bsz, g, r, nq, block, e)
    kp = torch.nn.functional.pad(k, (0, 0, 0, nk * block - m)).view(bsz, g, nk, block, e)
    vp = torch.nn.functional.pad(v, (0, 0, 0, nk * block - m)).view(bsz, g, nk, block, f)
    q_pool = qp.mean(dim=-2)
    k_pool = kp.sum(dim=-2) / torch.clamp(m - torch.arange(nk, device=dev) * block, max=block)[:, None]
    scores = torch.matmul(q_pool, k_pool.unsqueeze(2).transpose(-1, -2))  # [B,G,R,nq,nk]
    q_first = off + torch.arange(nq, device=dev) * block
    q_last = torch.clamp(q_first + block - 1, max=m - 1)
    k_start = torch.arange(nk, device=dev) * block
    must = ((k_start[None, :] // block == q_first[:, None] // block) |
            (k_start[None, :] // block == q_last[:, None] // block))
    rank = scores.masked_fill(must, float("inf"))
    if causal:
        rank = rank.masked_fill(k_start[None, :] > q_last[:, None], float("-inf"))
    idx = rank.topk(nsel, dim=-1).indices  # [B,G,R,nq,nsel]
    bi = torch.arange(bsz, device=dev)[:, None, None, None, None]
    gi = torch.arange(g, device=dev)[None, :, None, None, None]
    kw = kp[bi, gi, idx].flatten(-3, -2)  # [B,G,R,nq,nsel*block,E]
    vw = vp[bi, gi, idx].flatten(-3, -2)
    s = torch.matmul(qp, kw.transpose(-1, -2))  # [B,G,R,nq,block,nsel*block]
    kpos = (idx[..., None] * block + torch.arange(block, device=dev)).flatten(-2)  # [B,G,R,nq,W]
    bad = kpos >= m
    if causal:
        qpos = q_first[:, None] + torch.arange(block, device=dev)  # [nq, block]
        s.masked_fill_(bad[..., None, :] | (kpos[..., None, :] > qpos[..., :, None]), float("-inf"))
    else:
        s.masked_fill_(bad[..., None, :], float("-inf"))
    o = torch.matmul(torch.softmax(s, dim=-1), vw)  # [B,G,R,nq,block,F]
    return o.reshape(bsz, h, nq * block, f)[:, :, :p]
