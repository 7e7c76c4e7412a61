"""``block_sparse``: per query block, the top-k key blocks by pooled q/k scores (MInference style).

Spec: queries and keys are cut into ``block``-token blocks (queries at the end of the keys).
Mean-pooled q (per head) and k (per KV head, over real keys) give a block score matrix; each
query block keeps ``ceil(keep · n_key_blocks)`` key blocks: always the first block and the
blocks holding its own positions (the diagonal), then the best-scoring others.  Under ``causal``
blocks wholly in the future are never chosen, and keys after the query are masked element-wise.
keep = 1 keeps every visible block, which is exact attention.

The op's mask takes part in the selection: a key block the mask hides wholly from a query block
(every score of the tile masked: bool False, or an additive value <= ``HIDDEN_BELOW``) is never
chosen, not even as the first or diagonal block, and keys are pooled over the ones the mask lets
some query see.  Skipping such a tile changes nothing a query with any visible key computes
(its weights there are exactly 0), so on padded batches the kept budget goes to real keys.  A
query block with no visible key at all gets no blocks and outputs 0 (as FlexAttention does).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import sympy
import torch
import torch.nn.functional as F

from codegen.naive import as4d, naive_attention, visible_of
from codegen.pattern import EVERY_KEY, BlockMap, dense_blocks, from_dense_blocks, intervals, visible
from codegen.registry import KernelVariant, TritonKernel, register
from codegen.sparse import no_fill, run_block_map
from cost_model import ir
from cost_model.cascades import core, finish, size, softmax_form
from cost_model.ir import Access, Einsum

VARIANT = "block_sparse"


def live_blocks(mask: Optional[torch.Tensor], p: int, m: int, block: int) -> Optional[torch.Tensor]:
    """[B|1, H|1, nq|1, nk] bool: tiles where the op mask lets at least one score through (None: no mask)."""
    if mask is None:
        return None
    return _live(visible_of(as4d(mask)), p, m, block)


def _live(vis: torch.Tensor, p: int, m: int, block: int) -> torch.Tensor:
    nq, nk = math.ceil(p / block), math.ceil(m / block)
    if vis.shape[3] == 1:
        vis = vis.expand(*vis.shape[:3], m)
    if vis.shape[2] != 1:  # padded rows and keys are False: they never make a tile live
        vis = F.pad(vis, (0, 0, 0, nq * block - p)).view(*vis.shape[:2], nq, block, m).any(3)
    return F.pad(vis, (0, nk * block - m)).view(*vis.shape[:3], nk, block).any(-1)


def _blocks(x: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """[B, heads, N, E] -> [B, heads, n, block, E], zero-padded (only when N is not a multiple: a pad copies)."""
    if x.shape[2] != n * block:
        x = F.pad(x, (0, 0, 0, n * block - x.shape[2]))
    return x.reshape(x.shape[0], x.shape[1], n, block, x.shape[-1])


def select_blocks(q: torch.Tensor, k: torch.Tensor, causal: bool, keep: float, block: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, H, nq, nk] bool: the key blocks each query block keeps (the data-dependent spec)."""
    if not 0 < keep <= 1:
        raise ValueError("block_sparse: keep must be in (0, 1]")
    bsz, h, p, e = q.shape
    g, m = k.shape[1], k.shape[2]
    off = m - p
    nq, nk = math.ceil(p / block), math.ceil(m / block)
    nsel = min(nk, max(1, math.ceil(keep * nk)))
    qf, kf = q.float(), k.float()
    dev = q.device  # every index tensor lives with q, so the selection also runs on CUDA
    qcount = torch.clamp(p - torch.arange(nq, device=dev) * block, max=block).to(qf.dtype)
    q_pool = _blocks(qf, nq, block).sum(3) / qcount[:, None]
    vis = None if mask is None else visible_of(as4d(mask))
    live = None if vis is None else _live(vis, p, m, block)
    kb = _blocks(kf, nk, block)  # [B, G, nk, block, E]
    if vis is None:
        kcount = torch.clamp(m - torch.arange(nk, device=dev) * block, max=block).to(kf.dtype)
        k_pool = kb.sum(3) / kcount[:, None]
    else:
        # pool each block over the keys some query may see: hidden (padding) keys would drag the
        # block's mean toward junk and mis-rank a partly padded block
        kvis = vis.any(2)  # [B|1, H|1, M|1]
        w = F.pad(kvis.expand(*kvis.shape[:2], m).to(kf.dtype), (0, nk * block - m))
        w = w.view(*w.shape[:2], nk, 1, block)
        if w.shape[1] != 1:  # a per-head mask: pool per query head
            kb = kb.repeat_interleave(h // g, dim=1)
        k_pool = (w @ kb).squeeze(-2) / w.sum(-1).clamp(min=1.0)  # a batched matmul: no [.., block, E] product
    if k_pool.shape[1] != h:
        k_pool = k_pool.repeat_interleave(h // g, dim=1)
    scores = q_pool @ k_pool.transpose(-1, -2)  # [B,H,nq,nk]
    q_first = off + torch.arange(nq, device=dev) * block
    q_last = torch.clamp(q_first + block - 1, max=m - 1)
    kb = torch.arange(nk, device=dev)[None, :]
    diag = (kb >= (q_first.clamp(min=0) // block)[:, None]) & (kb <= (q_last // block)[:, None])
    must = diag | (kb == 0)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=dev)
    if causal:
        allowed = kb * block <= q_last[:, None]
    if live is not None:
        allowed = allowed & live.to(dev)  # [B|1, H|1, nq, nk]
    must = must & allowed
    rank = scores.masked_fill(must, float("inf")).masked_fill(~allowed, float("-inf"))
    top = rank.topk(nsel, dim=-1).indices
    chosen = torch.zeros(bsz, h, nq, nk, dtype=torch.bool, device=dev).scatter_(-1, top, True)
    return chosen & allowed


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, keep: float, block: int = 64, **_
              ) -> torch.Tensor:
    """Naive dense attention with the selected blocks expanded to an element mask."""
    p, m = q.shape[2], k.shape[2]
    chosen = select_blocks(q, k, causal, keep, block, mask)
    elem = chosen.repeat_interleave(block, -2)[..., :p, :].repeat_interleave(block, -1)[..., :m]
    lo, hi = intervals(VARIANT, (), p, m, causal)
    return naive_attention(q, k, v, mask, scale, visible=elem & visible(lo, hi, m), softcap=softcap)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, keep: float, block: int = 64) -> torch.Tensor:
    """Block-sparse attention computing only the selected key blocks."""
    no_fill(VARIANT, mask, fill)
    block = int(block)
    if q.is_cuda or q.device.type == "cpu" and os.environ.get("REWRITER_TRITON") == "force":
        from codegen.triton import maybe_run  # late: Triton is optional
        out = maybe_run(VARIANT, q, k, v, mask, scale, causal, softcap, None, {"keep": keep, "block": block})
        if out is not None:
            return out
    p, m = q.shape[2], k.shape[2]
    chosen = select_blocks(q, k, causal, float(keep), block, mask)
    lo, hi = intervals(VARIANT, (), p, m, bool(causal))
    anyb, fullb = dense_blocks(lo, hi, m, block, block)
    bm = from_dense_blocks(chosen & anyb, chosen & fullb, block, block)
    return run_block_map(q, k, v, mask, scale, softcap, bm, lo, hi)


@functools.lru_cache(maxsize=32)
def _causal_blocks(p: int, m: int, causal: bool, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[nq, nk] visited/full flags of the element pattern (every key, causal clamped), memoised per length."""
    lo, hi = intervals(VARIANT, (), p, m, causal)
    return dense_blocks(lo, hi, m, blk, blk)


def block_map(params: dict, q: torch.Tensor, k: torch.Tensor, causal: bool,
              mask: Optional[torch.Tensor] = None) -> BlockMap:
    """The key blocks this call visits: the selected ones, never a tile the mask hides (for Triton)."""
    p, m, blk = q.shape[2], k.shape[2], int(params["block"])
    chosen = select_blocks(q, k, causal, float(params["keep"]), blk, mask)
    anyb, fullb = (x.to(q.device) for x in _causal_blocks(p, m, bool(causal), blk))
    return from_dense_blocks(chosen & anyb, chosen & fullb, blk, blk)


def _spec_params(params: dict) -> dict:
    return {"keep": params["keep"], "block": int(params.get("block", 64))}


def cascade(*, block: object = 64, keep: object = None, causal: bool = False, form: str | None = None,
                 schedule: str = "fused", tile_q: object = 64, tile_k: object = 64) -> ir.Cascade:
    """Block-sparse top-k: pooled q/k block scores choose keep*M/block key blocks per query block."""
    bs = size(block)
    form = softmax_form(form, schedule)
    kappa = size(keep) if keep is not None else sympy.Symbol("kappa", positive=True)
    q = Access("Q", ("b", "g", "r", "p1", "p0", "e"))
    kfull = Access("K", ("b", "g", "m1", "m0", "e"))
    sizes = [("b", ir.B), ("g", ir.G), ("r", ir.H / ir.G), ("p1", ir.P / bs), ("p0", bs), ("m1", ir.M / bs), ("m0", bs),
             ("w", kappa * ir.M), ("e", ir.E), ("f", ir.F)]
    pre = [
        Einsum(Access("QP", ("b", "g", "r", "p1", "e")), (q,), (), ("p0",), "sum"),
        Einsum(Access("KP", ("b", "g", "m1", "e")), (kfull,), (), ("m0",), "sum"),
        Einsum(Access("BS", ("b", "g", "r", "p1", "m1")), (Access("QP", ("b", "g", "r", "p1", "e")),
                                                           Access("KP", ("b", "g", "m1", "e"))),
               ("mul",), ("e",), "sum"),
        # top-k selection over the key blocks: a max-like reduction, one compare per block score
        Einsum(Access("SEL", ("b", "g", "r", "p1", "w")), (Access("BS", ("b", "g", "r", "p1", "m1")),), ("cmp",),
               ("m1",), "max"),
        Einsum(Access("KW", ("b", "g", "r", "p1", "w", "e")), (Access("SEL", ("b", "g", "r", "p1", "w")),
                                                              Access("K", ("b", "g", "r", "p1", "w", "e"))), ("copy",)),
        Einsum(Access("VW", ("b", "g", "r", "p1", "w", "f")), (Access("SEL", ("b", "g", "r", "p1", "w")),
                                                              Access("V", ("b", "g", "r", "p1", "w", "f"))), ("copy",)),
    ]
    k, v = Access("KW", ("b", "g", "r", "p1", "w", "e")), Access("VW", ("b", "g", "r", "p1", "w", "f"))
    # positions of the gathered keys against the query's: padding always, the future when causal
    mask = Access("SEL", ("b", "g", "r", "p1", "w"))
    ops, splits, it, groups = core(q, k, v, key="w", qranks=("b", "g", "r", "p1", "p0"), form=form, mask=mask,
                                    mask_ops=("cmp", "cmp", "add") if causal else ("cmp", "add"))
    ops = pre + ops
    sizes.append(("m", ir.M))
    splits = [("m", ("m1", "m0"))] + splits
    if form == "online":
        # pooled scoring and the attention over the chosen blocks are two kernels either way
        groups = [["QP", "KP", "BS", "SEL"], [e.name for e in ops[4:]]]
        fused = {1}
        schedule_groups = "eager"
    else:
        groups = [["QP"], ["KP"], ["BS"], ["SEL"], ["KW"], ["VW"]] + groups
        fused = set()
        schedule_groups = schedule
    return finish(VARIANT, ops, sizes, ("Q", "K", "V"), splits, it, groups, schedule_groups, key="m",
                   derived=("w",), fused_groups=fused, tile_ranks=("p0",), query="p1", tile_q=1, tile_k=tile_k,
                   notes="pooled block scores + top-k key blocks" + (", causal" if causal else ""),
                   params={"block": bs, "keep": kappa})


KERNEL = register(KernelVariant(
    name=VARIANT, kernel=kernel, reference=reference, spans=lambda **_: [EVERY_KEY], compiled_cpu=True,
    triton=TritonKernel("blockmap", ("keep", "block"), spec_params=_spec_params, block_map=block_map),
    timing=lambda n: {"keep": 0.25}, cascade=cascade, cascade_params={"block": int, "keep": float},
    examples=lambda n: [{"keep": 0.3, "block": 8}, {"keep": 0.6, "block": 16}],
    degenerate=lambda n, e: {"keep": 1.0, "block": 8}))
