"""``vertical_slash``: per head and per input, the key columns and diagonals the last queries attend to most.

MInference's vertical-slash pattern. The last ``last_q`` queries' attention over all keys is the estimate
(O(last_q·M) scores): summed over those queries it ranks key columns (vertical lines), and summed along
each diagonal (offset d = position of the query - key) it ranks slash lines. Each head keeps its top
``vertical`` columns plus the first ``sinks`` keys, and its top ``slash`` diagonals plus the local bands
at offsets 0, block, 2·block, ... below ``window``.

Queries are cut into blocks of ``block`` absolute positions (queries sit at the end of the keys: query i
is at position a = M - P + i). A kept diagonal d gives every query of block t = a // block the band of
keys [t·block - d, t·block - d + block - 1], so each slash line is a contiguous run of keys per query
block and the kernel reads it as one slice. Query a sees key j when j is a kept column or lies in one of
its block's bands (and j <= a under ``causal``). Attention is exact inside that set: the kernel gathers
only the kept columns and bands, and the naive reference masks dense attention to the same set.
``vertical + sinks >= M`` keeps every column: exact attention.
"""
from __future__ import annotations

from typing import Optional, Sequence

import sympy
import torch
import torch.nn.functional as F

from codegen.naive import naive_attention
from codegen.registry import KernelVariant, register
from codegen.variants import dense as _dense
from cost_model import ir
from cost_model.cascades import core, finish, size, softmax_form
from cost_model.ir import Access, Einsum

NAME = "vertical_slash"

# bounds the [heads, query blocks, block, kept keys] working set of one chunk of heads (elements)
_CHUNK_ELEMENTS = 1 << 25


def _check(vertical: int, slash: int, last_q: int, block: int, sinks: int, window: int) -> None:
    for name, value, low in (("vertical", vertical, 0), ("slash", slash, 0), ("last_q", last_q, 1),
                             ("block", block, 1), ("sinks", sinks, 0), ("window", window, 0)):
        if int(value) < low:
            raise ValueError(f"{NAME}: {name} must be >= {low}, not {value}")


def estimate(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, *, vertical: int, slash: int,
             last_q: int = 64, block: int = 64, sinks: int = 1, window: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [B, H, V] sorted, diagonals [B, H, S] sorted): each head's kept key columns and slash offsets.

    The last ``min(last_q, P)`` queries' softmax over all keys (scores in float32) is summed per key
    column and per diagonal; the first ``sinks`` columns and the local bands (offsets 0, block, ... below
    ``window``) are always kept, then the best-scoring others up to ``vertical`` and ``slash`` more.
    """
    _check(vertical, slash, last_q, block, sinks, window)
    b, h, p, e = q.shape
    g, m = k.shape[1], k.shape[2]
    dev = q.device
    n_last = min(int(last_q), p)
    q_last = q[:, :, p - n_last:].float()
    kh = k.float().repeat_interleave(h // g, dim=1) if g != h else k.float()
    s = (q_last @ kh.transpose(-1, -2)) * float(scale)  # [B, H, L, M]
    pos = (m - n_last) + torch.arange(n_last, device=dev)  # the absolute positions of those queries
    j = torch.arange(m, device=dev)
    if causal:
        s = s.masked_fill(j[None, :] > pos[:, None], float("-inf"))
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)
    col_score = a.sum(2)  # [B, H, M]
    offsets = (pos[:, None] - j[None, :]) + (m - 1)  # diagonal d = pos - j, shifted to index 0..2M-2
    diag_score = torch.zeros(b, h, 2 * m - 1, device=dev).scatter_add_(
        -1, offsets.reshape(1, 1, -1).expand(b, h, -1), a.reshape(b, h, -1))
    lowest = 0 if causal else -(m - 1)  # under causal no key lies ahead of its query
    diag_score = diag_score[..., lowest + m - 1:]  # offsets lowest .. M-1
    n_sinks = min(int(sinks), m)
    col_score[..., :n_sinks] = float("inf")
    local = torch.arange(0, max(int(window), 0), int(block), device=dev)
    local = local[local < m]
    diag_score[..., local - lowest] = float("inf")
    n_cols = min(m, int(vertical) + n_sinks)
    n_diags = min(diag_score.shape[-1], int(slash) + local.numel())
    cols = col_score.topk(n_cols, dim=-1).indices.sort(-1).values
    diags = (diag_score.topk(n_diags, dim=-1).indices + lowest).sort(-1).values
    return cols, diags


def kept(p: int, m: int, cols: torch.Tensor, diags: torch.Tensor, block: int, causal: bool) -> torch.Tensor:
    """[B, H, P, M] bool: the keys each query sees (the naive form of the pattern, for the reference)."""
    dev = cols.device
    a = (m - p) + torch.arange(p, device=dev)
    start = (a // block) * block  # the first position of each query's block
    j = torch.arange(m, device=dev)
    vis = torch.zeros(*cols.shape[:2], p, m, dtype=torch.bool, device=dev)
    vis |= torch.zeros(*cols.shape[:2], m, dtype=torch.bool, device=dev).scatter_(-1, cols, True)[:, :, None, :]
    for s in range(diags.shape[-1]):
        lo = start[None, None, :] - diags[..., s, None]  # [B, H, P]
        vis |= (j >= lo[..., None]) & (j < lo[..., None] + block)
    if causal:
        vis &= j[None, :] <= a[:, None]
    return vis


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, vertical: int, slash: int, last_q: int = 64,
              block: int = 64, sinks: int = 1, window: int = 128, **_) -> torch.Tensor:
    """Naive float64 attention masked to the kept columns and bands."""
    cols, diags = estimate(q, k, scale, causal, vertical=vertical, slash=slash, last_q=last_q, block=block,
                           sinks=sinks, window=window)
    vis = kept(q.shape[2], k.shape[2], cols, diags, int(block), causal)
    return naive_attention(q, k, v, mask, scale, visible=vis, softcap=softcap)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0, fill: Optional[float] = None,
           vertical: int, slash: int, last_q: int = 64, block: int = 64, sinks: int = 1,
           window: int = 128) -> torch.Tensor:
    """Attention over each head's kept columns and slash bands only: two gathers, one softmax, two products."""
    if mask is not None:
        raise ValueError(f"{NAME} takes no mask (it applies to causal or unmasked self-attention)")
    block = int(block)
    cols, diags = estimate(q, k, scale, causal, vertical=vertical, slash=slash, last_q=last_q, block=block,
                           sinks=sinks, window=window)
    b, h, p, e = q.shape
    g, m, f = k.shape[1], k.shape[2], v.shape[-1]
    n_blocks = (m - 1) // block + 1 - (m - p) // block
    per_head = n_blocks * (block + e + f) * (cols.shape[-1] + diags.shape[-1] * block)
    step = max(1, _CHUNK_ELEMENTS // max(per_head, 1))
    out = torch.empty(b, h, p, f, dtype=q.dtype, device=q.device)
    rep = h // g
    for h0 in range(0, h, step):
        h1 = min(h, h0 + step)
        kv_heads = torch.arange(h0, h1, device=q.device) // rep
        out[:, h0:h1] = _attend(q[:, h0:h1], k[:, kv_heads], v[:, kv_heads], cols[:, h0:h1], diags[:, h0:h1],
                                float(scale), bool(causal), float(softcap), block)
    return out


def _partial(q, k, v, bias, seen, scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of attention with an additive ``bias`` (-inf hides); rows ``seen`` marks False see
    no key and give 0 and -inf.

    The parts of the pattern are computed apart and merged by their log-sum-exp. On the CPU the fused
    flash kernel returns it; elsewhere (and with a soft-cap, or a value dim unlike the key dim) it is
    written out.
    """
    if k.shape[-2] == 0:  # no column (or no band) kept: the fused kernel cannot take zero keys
        return (q.new_zeros(*q.shape[:-1], v.shape[-1]),
                torch.full(q.shape[:-1], float("-inf"), device=q.device))
    empty = ~seen.expand(q.shape[:-1])
    if q.device.type == "cpu" and softcap == 0 and q.shape[-1] == v.shape[-1]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                              scale=scale)
    else:
        s = (q @ k.transpose(-1, -2)).float() * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s + bias
        lse = torch.logsumexp(s, -1)
        out = (torch.exp(s - lse[..., None]).nan_to_num(0.0).to(v.dtype) @ v)
    return out.masked_fill(empty[..., None], 0.0), lse.float().masked_fill(empty, float("-inf"))


def _hide(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a visibility mask: 0 where visible, -inf where not."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def _attend(q, k, v, cols, diags, scale: float, causal: bool, softcap: float, block: int) -> torch.Tensor:
    """One chunk of heads (k and v already per query head), in query blocks, as up to three merged parts.

    Under ``causal`` only the keys of a query's own block need a per-query mask; everything before the
    block is seen whole by every query of it. So: (1) the own block, a view of K with a small causal mask;
    (2) the slash bands' keys before the block, gathered, with a per-key mask; (3) the kept columns before
    the block, one copy of them shared by every block (a stride-0 view), with a per-key mask. Without
    ``causal`` every kept key is seen whole, and parts (2) and (3) take all of them.
    """
    b, h, p, e = q.shape
    m, f = k.shape[2], v.shape[-1]
    dev, bh, dt = q.device, b * h, q.dtype
    off = m - p
    first = off // block  # the block of the first query (blocks are of absolute positions)
    n_blocks = (m - 1) // block + 1 - first
    lead = off - first * block  # positions of the first block before the first query
    start = (first + torch.arange(n_blocks, device=dev)) * block  # [T]
    limit = start[None, :, None] if causal else torch.full((1, 1, 1), m, device=dev)  # keys before this: parts 2, 3
    qb = F.pad(q, (0, 0, lead, n_blocks * block - p - lead)).view(bh, n_blocks, block, e)
    cols2, diags2 = cols.reshape(bh, -1), diags.reshape(bh, -1)
    parts = []
    # (2) slash bands: per block, S runs of ``block`` keys starting at start - d
    n_d = diags2.shape[-1]
    band = (start[None, :, None] - diags2[:, None, :])[..., None] + torch.arange(block, device=dev)  # [BH,T,S,blk]
    ok = (band >= 0) & (band < limit[..., None])
    if n_d > 1:  # a band overlapping the previous (smaller offset) band repeats its keys: keep them once
        gap = torch.cat([torch.full_like(diags2[:, :1], block), diags2[:, 1:] - diags2[:, :-1]], -1)
        ok &= torch.arange(block, device=dev) < gap[:, None, :, None]
    band, ok = band.reshape(bh, n_blocks, -1), ok.reshape(bh, n_blocks, -1)
    if cols2.shape[-1]:  # a band key that is also a kept column is counted with the columns
        at = torch.searchsorted(cols2, band.reshape(bh, -1)).clamp(max=cols2.shape[-1] - 1)
        ok &= (cols2.gather(1, at) != band.reshape(bh, -1)).view_as(ok)
    if n_d:
        flat = (band.clamp(0, m - 1) + (torch.arange(bh, device=dev) * m)[:, None, None]).reshape(-1)
        kg = k.reshape(bh * m, e).index_select(0, flat).view(bh, n_blocks, -1, e)
        vg = v.reshape(bh * m, f).index_select(0, flat).view(bh, n_blocks, -1, f)
        parts.append(_partial(qb, kg, vg, _hide(ok[:, :, None, :], dt), ok.any(-1)[..., None], scale, softcap))
    # (3) kept columns, shared by every block
    if cols2.shape[-1]:
        seen = cols2[:, None, :] < limit  # [BH, T, V]
        kc = k.reshape(bh * m, e).index_select(0, (cols2 + (torch.arange(bh, device=dev) * m)[:, None]).reshape(-1))
        vc = v.reshape(bh * m, f).index_select(0, (cols2 + (torch.arange(bh, device=dev) * m)[:, None]).reshape(-1))
        kc = kc.view(bh, 1, -1, e).expand(-1, n_blocks, -1, -1)
        vc = vc.view(bh, 1, -1, f).expand(-1, n_blocks, -1, -1)
        parts.append(_partial(qb, kc, vc, _hide(seen[:, :, None, :], dt), seen.any(-1)[..., None], scale, softcap))
    # (1) the own block under causal: the keys a band (offsets below block) or a column keeps, up to the query
    if causal:
        x = torch.arange(block, device=dev)
        near = torch.where(diags2 < block, diags2, block).amin(-1)  # the smallest kept offset below block
        own = x[None, None, :] < (block - near)[:, None, None]  # [BH, 1, blk]: keys the bands keep
        in_block = cols2[:, None, :] - start[None, :, None]  # [BH, T, V]: columns in the block, by offset
        hit = torch.zeros(bh, n_blocks, block + 1, dtype=torch.bool, device=dev)
        hit.scatter_(-1, torch.where((in_block >= 0) & (in_block < block), in_block, block), True)
        key_ok = (own | hit[..., :block]) & ((start[:, None] + x) < m)[None]  # [BH, T, blk]
        vis = key_ok[:, :, None, :] & (x[None, :] <= x[:, None])[None, None]  # [BH, T, q, k]
        pad = n_blocks * block + first * block - m
        kb = F.pad(k, (0, 0, 0, max(pad, 0)))[:, :, first * block:].reshape(bh, n_blocks, block, e)
        vb = F.pad(v, (0, 0, 0, max(pad, 0)))[:, :, first * block:].reshape(bh, n_blocks, block, f)
        parts.append(_partial(qb, kb, vb, _hide(vis, dt), vis.any(-1), scale, softcap))
    if not parts:
        return q.new_zeros(b, h, p, f)
    lse = torch.stack([x[1] for x in parts])
    total = torch.logsumexp(lse, 0)
    w = torch.exp(lse - total).nan_to_num(0.0).to(dt)  # [parts, BH, T, blk]
    out = sum(o * w[i, ..., None] for i, (o, _) in enumerate(parts))
    return out.reshape(b, h, n_blocks * block, f)[:, :, lead:lead + p]


def cascade(*, vertical: object = None, slash: object = None, last_q: object = 64, block: object = 64,
            causal: bool = False, form: str | None = None, schedule: str = "fused", tile_q: object = 64,
            tile_k: object = 64, **_) -> ir.Cascade:
    """The estimate (last_q queries against every key), then attention over V columns and S bands of block keys."""
    bs, nl = size(block), size(last_q)
    nv = size(vertical) if vertical is not None else sympy.Symbol("V", positive=True)
    ns = size(slash) if slash is not None else sympy.Symbol("S", positive=True)
    form = softmax_form(form, schedule)
    q = Access("Q", ("b", "g", "r", "p1", "p0", "e"))
    sizes = [("b", ir.B), ("g", ir.G), ("r", ir.H / ir.G), ("p1", ir.P / bs), ("p0", bs), ("l", nl), ("m", ir.M),
             ("w", nv + ns * bs), ("e", ir.E), ("f", ir.F)]
    pre = [
        Einsum(Access("EST", ("b", "g", "r", "l", "m")), (Access("QL", ("b", "g", "r", "l", "e")),
                                                          Access("K", ("b", "g", "m", "e"))), ("mul",), ("e",), "sum"),
        # softmax of the estimate and its sums per column and per diagonal: a few passes over [l, m]
        Einsum(Access("LINES", ("b", "g", "r", "m")), (Access("EST", ("b", "g", "r", "l", "m")),),
               ("exp", "add", "add"), ("l",), "sum"),
        Einsum(Access("SEL", ("b", "g", "r", "w")), (Access("LINES", ("b", "g", "r", "m")),), ("cmp",), ("m",), "max"),
        Einsum(Access("KW", ("b", "g", "r", "p1", "w", "e")), (Access("SEL", ("b", "g", "r", "w")),
                                                              Access("K", ("b", "g", "r", "p1", "w", "e"))), ("copy",)),
        Einsum(Access("VW", ("b", "g", "r", "p1", "w", "f")), (Access("SEL", ("b", "g", "r", "w")),
                                                              Access("V", ("b", "g", "r", "p1", "w", "f"))), ("copy",)),
    ]
    k, v = Access("KW", ("b", "g", "r", "p1", "w", "e")), Access("VW", ("b", "g", "r", "p1", "w", "f"))
    mask = Access("SEL", ("b", "g", "r", "w"))
    ops, splits, it, groups = core(q, k, v, key="w", qranks=("b", "g", "r", "p1", "p0"), form=form, mask=mask,
                                   mask_ops=("cmp", "cmp", "add") if causal else ("cmp", "add"))
    ops = pre + ops
    splits = [("p", ("p1", "p0"))] + splits
    if form == "online":
        groups = [["EST", "LINES", "SEL"], [x.name for x in ops[3:]]]
        fused, schedule_groups = {1}, "eager"
    else:
        groups = [["EST"], ["LINES"], ["SEL"], ["KW"], ["VW"]] + groups
        fused, schedule_groups = set(), schedule
    return finish(NAME, ops, sizes, ("Q", "QL", "K", "V"), splits, it, groups, schedule_groups, key="m",
                  derived=("w",), fused_groups=fused, tile_ranks=("p0",), query="p1", tile_q=1, tile_k=tile_k,
                  notes="last-query estimate + vertical columns and slash bands" + (", causal" if causal else ""),
                  params={"vertical": nv, "slash": ns, "last_q": nl, "block": bs})


KERNEL = register(KernelVariant(
    name=NAME, kernel=kernel, reference=reference, supports=frozenset({"softcap", "gqa"}),
    # its parts run the library's fused attention on gathered keys: priced with dense's calibrated factor
    # (timing it on its own doubled the calibration, for a kernel that only applies from 2048 keys)
    timed_as=_dense.KERNEL.name, cascade=cascade,
    cascade_params={"vertical": int, "slash": int, "last_q": int, "block": int},
    examples=lambda n: [{"vertical": 3, "slash": 2, "last_q": 4, "block": 8, "window": 8},
                        {"vertical": 5, "slash": 1, "last_q": 64, "block": 5, "sinks": 2, "window": 0},
                        {"vertical": 0, "slash": 3, "last_q": 2, "block": 4, "sinks": 0, "window": 16}],
    degenerate=lambda n, e: {"vertical": n, "slash": 0, "last_q": 4, "block": 8}))
