"""``block_sparse``: per query block, the key blocks an estimate of the scores ranks first.

Two estimators choose the blocks.  ``tau = 0`` (the default) ranks key blocks by mean-pooled q/k
scores and keeps the top ``keep`` share (MInference style).  ``tau > 0`` scores each tile by strided
antidiagonal sums (XAttention): every ``stride``-th antidiagonal of the tile's scores, from one
matmul of q and k regrouped ``stride`` tokens at a time (O(P·M·E/stride)); a softmax over those
sums estimates each tile's attention mass, and each query block keeps its tiles, heaviest first,
until a share ``tau`` of its estimated mass is covered, but never more than ``keep`` of the key
blocks (``keep`` caps the work, and is what the cost model prices).

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


def _regroup(x: torch.Tensor, n: int, stride: int, reverse: bool) -> torch.Tensor:
    """[B, heads, N, E] -> [B, heads, n, stride·E]: each group of ``stride`` tokens side by side (zero-padded)."""
    if x.shape[2] != n * stride:
        x = F.pad(x, (0, 0, 0, n * stride - x.shape[2]))
    x = x.reshape(x.shape[0], x.shape[1], n, stride, x.shape[-1])
    if reverse:
        x = x.flip(3)
    return x.reshape(x.shape[0], x.shape[1], n, stride * x.shape[-1])


def antidiagonal_mass(q: torch.Tensor, k: torch.Tensor, causal: bool, block: int, stride: int, scale: float,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, H, nq, nk] float: each tile's share of its query block's attention, estimated from strided
    antidiagonal sums (XAttention); rows sum to 1 over the tiles a query of the block may see."""
    bsz, h, p, e = q.shape
    g, m = k.shape[1], k.shape[2]
    s = max(1, min(int(stride), block))
    pg, mg = math.ceil(p / s), math.ceil(m / s)
    # query group i reversed against key group j: their product sums the antidiagonal
    # q[iS+S-1]·k[jS] + q[iS+S-2]·k[jS+1] + ... of the S×S tile of scores at (i, j)
    qs = _regroup(q.float(), pg, s, reverse=True)
    ks = _regroup(k.float(), mg, s, reverse=False)
    if g != h:
        ks = ks.repeat_interleave(h // g, dim=1)
    logits = (qs @ ks.transpose(-1, -2)) * (float(scale) / s)  # [B, H, pg, mg]: the antidiagonal's mean score
    dev = q.device
    kpos = torch.arange(mg, device=dev) * s
    hide = (kpos >= m)[None, :].expand(pg, mg)  # groups of padding only
    if causal:
        qlast = (m - p) + torch.clamp(torch.arange(pg, device=dev) * s + s - 1, max=p - 1)
        hide = hide | (kpos[None, :] > qlast[:, None])
    if mask is not None:  # a key group no query may see (padding) takes no mass
        kvis = visible_of(as4d(mask)).any(2)  # [B|1, H|1, M|1]
        kvis = F.pad(kvis.expand(*kvis.shape[:2], m), (0, mg * s - m)).view(*kvis.shape[:2], mg, s).any(-1)
        hide = hide | ~kvis[:, :, None, :]
    logits = logits.masked_fill(hide, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with nothing visible has no mass
    qrow = (torch.arange(pg, device=dev) * s < p).to(probs.dtype)  # rows of padded queries only carry nothing
    probs = probs * qrow[:, None]
    nq, nk = math.ceil(p / block), math.ceil(m / block)
    # sum the strided entries of each block×block tile (a group sits in the tile holding its first token)
    if block % s == 0:  # r whole groups per tile: a reshape and a sum, no [nq, pg] x [pg, mg] product
        r = block // s
        padded = F.pad(probs, (0, nk * r - mg, 0, nq * r - pg))
        mass = padded.view(*padded.shape[:2], nq, r, nk, r).sum((3, 5))
    else:
        qtile = torch.div(torch.arange(pg, device=dev) * s, block, rounding_mode="floor")
        ktile = torch.div(kpos, block, rounding_mode="floor")
        rows = torch.zeros(nq, pg, device=dev, dtype=probs.dtype).index_put_(
            (qtile, torch.arange(pg, device=dev)), torch.ones(pg, device=dev, dtype=probs.dtype))
        cols = torch.zeros(mg, nk, device=dev, dtype=probs.dtype).index_put_(
            (torch.arange(mg, device=dev), ktile), torch.ones(mg, device=dev, dtype=probs.dtype))
        mass = rows @ probs @ cols  # [B, H, nq, nk]
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)


def _by_mass(mass: torch.Tensor, must: torch.Tensor, allowed: torch.Tensor, tau: float,
             nsel: int) -> torch.Tensor:
    """Tiles heaviest first (the first and diagonal blocks ahead of all) until ``tau`` of the mass is covered."""
    rank = mass.masked_fill(~allowed, -1.0).masked_fill(must & allowed, 2.0)
    order = rank.argsort(dim=-1, descending=True)
    sorted_mass = mass.masked_fill(~allowed, 0.0).gather(-1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass  # the mass covered before each tile is added
    take = before < tau
    take[..., :1] = True
    take[..., nsel:] = False
    take = take | (rank.gather(-1, order) >= 2.0)  # the first and diagonal blocks always, as the top-k estimator
    return torch.zeros_like(take).scatter_(-1, order, take)


def select_blocks(q: torch.Tensor, k: torch.Tensor, causal: bool, keep: float, block: int,
                  mask: Optional[torch.Tensor] = None, *, tau: float = 0.0, stride: int = 8,
                  scale: Optional[float] = None) -> torch.Tensor:
    """[B, H, nq, nk] bool: the key blocks each query block keeps (the data-dependent spec)."""
    if not 0 < keep <= 1:
        raise ValueError("block_sparse: keep must be in (0, 1]")
    if not 0 <= tau <= 1:
        raise ValueError(f"block_sparse: tau is the share of estimated attention mass kept, in [0, 1], not {tau}")
    if tau > 0:
        return _select_by_mass(q, k, causal, keep, block, mask, tau, stride,
                               q.shape[-1] ** -0.5 if scale is None else scale)
    bsz, h, p, e = q.shape
    g, m = k.shape[1], k.shape[2]
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
    must, allowed = _must_allowed(p, m, block, causal, live, dev)
    rank = scores.masked_fill(must, float("inf")).masked_fill(~allowed, float("-inf"))
    top = rank.topk(nsel, dim=-1).indices
    chosen = torch.zeros(bsz, h, nq, nk, dtype=torch.bool, device=dev).scatter_(-1, top, True)
    return chosen & allowed


def _must_allowed(p: int, m: int, block: int, causal: bool, live: Optional[torch.Tensor], dev
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks always kept (first and diagonal) and the ones that may be (not future, not hidden)."""
    nq, nk = math.ceil(p / block), math.ceil(m / block)
    q_first = (m - p) + torch.arange(nq, device=dev) * block
    q_last = torch.clamp(q_first + block - 1, max=m - 1)
    kb = torch.arange(nk, device=dev)[None, :]
    diag = (kb >= (q_first.clamp(min=0) // block)[:, None]) & (kb <= (q_last // block)[:, None])
    allowed = kb * block <= q_last[:, None] if causal else torch.ones(nq, nk, dtype=torch.bool, device=dev)
    if live is not None:
        allowed = allowed & live.to(dev)
    return (diag | (kb == 0)) & allowed, allowed


def _select_by_mass(q: torch.Tensor, k: torch.Tensor, causal: bool, keep: float, block: int,
                    mask: Optional[torch.Tensor], tau: float, stride: int, scale: float) -> torch.Tensor:
    p, m = q.shape[2], k.shape[2]
    nk = math.ceil(m / block)
    nsel = min(nk, max(1, math.ceil(keep * nk)))
    live = None if mask is None else _live(visible_of(as4d(mask)), p, m, block)
    must, allowed = _must_allowed(p, m, block, causal, live, q.device)
    mass = antidiagonal_mass(q, k, causal, block, stride, scale, mask)
    must, allowed = must.expand_as(mass), allowed.expand_as(mass)
    return _by_mass(mass, must, allowed, float(tau), nsel) & allowed


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, keep: float = 0.25, block: int = 64,
              tau: float = 0.0, stride: int = 8, **_) -> torch.Tensor:
    """Naive dense attention with the selected blocks expanded to an element mask."""
    p, m = q.shape[2], k.shape[2]
    chosen = select_blocks(q, k, causal, _cap(keep, tau), block, mask, tau=tau, stride=stride, scale=scale)
    elem = chosen.repeat_interleave(block, -2)[..., :p, :].repeat_interleave(block, -1)[..., :m]
    lo, hi = intervals(VARIANT, (), p, m, causal)
    return naive_attention(q, k, v, mask, scale, visible=elem & visible(lo, hi, m), softcap=softcap)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, keep: float = 0.25, block: int = 64, tau: float = 0.0,
           stride: int = 8) -> torch.Tensor:
    """Block-sparse attention computing only the selected key blocks."""
    no_fill(VARIANT, mask, fill)
    block, keep, tau, stride = int(block), _cap(keep, tau), float(tau), int(stride)
    if q.is_cuda or q.device.type == "cpu" and os.environ.get("REWRITER_TRITON") == "force":
        from codegen.triton import maybe_run  # late: Triton is optional
        out = maybe_run(VARIANT, q, k, v, mask, scale, causal, softcap, None,
                        {"keep": keep, "block": block, "tau": tau, "stride": stride})
        if out is not None:
            return out
    p, m = q.shape[2], k.shape[2]
    chosen = select_blocks(q, k, causal, keep, block, mask, tau=tau, stride=stride, scale=scale)
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
              mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> BlockMap:
    """The key blocks this call visits: the selected ones, never a tile the mask hides (for Triton)."""
    p, m, blk = q.shape[2], k.shape[2], int(params["block"])
    tau = float(params.get("tau", 0.0))
    chosen = select_blocks(q, k, causal, _cap(params["keep"], tau), blk, mask, tau=tau,
                           stride=int(params.get("stride", 8)), scale=scale)
    anyb, fullb = (x.to(q.device) for x in _causal_blocks(p, m, bool(causal), blk))
    return from_dense_blocks(chosen & anyb, chosen & fullb, blk, blk)


def _cap(keep: float, tau: float) -> float:
    """The kept share of key blocks; under the mass estimator 0 means no cap (every block may be kept)."""
    return 1.0 if float(tau) > 0 and float(keep) == 0 else float(keep)


def _spec_params(params: dict) -> dict:
    tau = float(params.get("tau", 0.0))
    return {"keep": _cap(params.get("keep", 0.25), tau), "block": int(params.get("block", 64)), "tau": tau,
            "stride": int(params.get("stride", 8))}


def _pooled_estimate(bs, q: Access) -> list[Einsum]:
    """Mean-pooled q and k blocks and their block score matrix BS."""
    return [
        Einsum(Access("QP", ("b", "g", "r", "p1", "e")), (q,), (), ("p0",), "sum"),
        Einsum(Access("KP", ("b", "g", "m1", "e")), (Access("K", ("b", "g", "m1", "m0", "e")),), (), ("m0",), "sum"),
        Einsum(Access("BS", ("b", "g", "r", "p1", "m1")), (Access("QP", ("b", "g", "r", "p1", "e")),
                                                           Access("KP", ("b", "g", "m1", "e"))),
               ("mul",), ("e",), "sum"),
    ]


def _antidiagonal_estimate() -> list[Einsum]:
    """Strided antidiagonal sums (one product at width stride·E), their softmax weights, summed per tile (BS)."""
    qs, ks = Access("QS", ("b", "g", "r", "p1", "pq", "x")), Access("KS", ("b", "g", "m1", "mq", "x"))
    al = Access("AL", ("b", "g", "r", "p1", "pq", "m1", "mq"))
    return [
        Einsum(qs, (Access("Q", ("b", "g", "r", "p1", "pq", "x")),), ("copy",)),
        Einsum(ks, (Access("K", ("b", "g", "m1", "mq", "x")),), ("copy",)),
        Einsum(al, (qs, ks), ("mul",), ("x",), "sum"),
        Einsum(Access("AE", al.ranks), (al,), ("exp",)),
        Einsum(Access("BS", ("b", "g", "r", "p1", "m1")), (Access("AE", al.ranks),), (), ("pq", "mq"), "sum"),
    ]


def cascade(*, block: object = 64, keep: object = None, tau: object = 0.0, stride: object = 8, causal: bool = False,
            form: str | None = None, schedule: str = "fused", tile_q: object = 64, tile_k: object = 64) -> ir.Cascade:
    """Block-sparse: pooled or antidiagonal block scores choose up to keep*M/block key blocks per query block."""
    bs = size(block)
    form = softmax_form(form, schedule)
    kappa = size(keep) if keep is not None else sympy.Symbol("kappa", positive=True)
    mass = float(tau or 0) > 0
    q = Access("Q", ("b", "g", "r", "p1", "p0", "e"))
    sizes = [("b", ir.B), ("g", ir.G), ("r", ir.H / ir.G), ("p1", ir.P / bs), ("p0", bs), ("m1", ir.M / bs), ("m0", bs),
             ("w", kappa * ir.M), ("e", ir.E), ("f", ir.F)]
    if mass:
        st = size(min(int(stride), int(block)) if isinstance(stride, int) and isinstance(block, int) else stride)
        sizes += [("pq", bs / st), ("mq", bs / st), ("x", st * ir.E)]
    estimate = _antidiagonal_estimate() if mass else _pooled_estimate(bs, q)
    pre = estimate + [
        # the selection over the key blocks: a sort-like reduction, one compare per block score
        Einsum(Access("SEL", ("b", "g", "r", "p1", "w")), (Access("BS", ("b", "g", "r", "p1", "m1")),), ("cmp",),
               ("m1",), "max"),
        Einsum(Access("KW", ("b", "g", "r", "p1", "w", "e")), (Access("SEL", ("b", "g", "r", "p1", "w")),
                                                              Access("K", ("b", "g", "r", "p1", "w", "e"))), ("copy",)),
        Einsum(Access("VW", ("b", "g", "r", "p1", "w", "f")), (Access("SEL", ("b", "g", "r", "p1", "w")),
                                                              Access("V", ("b", "g", "r", "p1", "w", "f"))), ("copy",)),
    ]
    nest = len(estimate) + 1
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
        groups = [[e.name for e in ops[:nest]], [e.name for e in ops[nest:]]]
        fused = {1}
        schedule_groups = "eager"
    else:
        groups = [[e.name] for e in pre] + groups
        fused = set()
        schedule_groups = schedule
    return finish(VARIANT, ops, sizes, ("Q", "K", "V"), splits, it, groups, schedule_groups, key="m",
                   derived=("w",), fused_groups=fused, tile_ranks=("p0",), query="p1", tile_q=1, tile_k=tile_k,
                   notes=("antidiagonal block mass up to tau" if mass else "pooled block scores + top-k key blocks")
                   + (", causal" if causal else ""), params={"block": bs, "keep": kappa})


KERNEL = register(KernelVariant(
    name=VARIANT, kernel=kernel, reference=reference, spans=lambda **_: [EVERY_KEY], compiled_cpu=True,
    triton=TritonKernel("blockmap", ("keep", "block", "tau", "stride"), spec_params=_spec_params, block_map=block_map),
    timing=lambda n: {"keep": 0.25}, cascade=cascade,
    cascade_params={"block": int, "keep": float, "tau": float, "stride": int},
    examples=lambda n: [{"keep": 0.3, "block": 8}, {"keep": 0.6, "block": 16},
                        {"keep": 1.0, "block": 8, "tau": 0.7, "stride": 4}, {"keep": 0.4, "block": 16, "tau": 0.9}],
    degenerate=lambda n, e: {"keep": 1.0, "block": 8}))
