"""Portable CPU lowering of any block map: gather each query block's key blocks, run SDPA on them.

The key blocks a query block visits (``BlockMap``) are gathered into one contiguous span per
query block, so work is proportional to the blocks in the pattern: blocks outside it are never
computed.  Inside visited blocks the element pattern (from the intervals) and the user's mask are
one additive bias.  This is the fallback when the compiled C++ kernel (``codegen.cpu_kernel``)
is unavailable, and the path for half precision and exotic masks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from codegen.naive import as4d
from codegen.pattern import BlockMap

_BUDGET_BYTES = 96 << 20  # scores + gathered K/V per step; keeps peak memory flat in N


def _user_bias(mask: torch.Tensor, rows: torch.Tensor, kpos: torch.Tensor, p: int, m: int) -> torch.Tensor:
    """Gather the op mask at (query row, key) pairs: rows [c,bq], kpos [..,c,L] -> [Bm,Hm,..,c,bq,L]."""
    m4 = as4d(mask)
    r = rows.clamp(max=p - 1) if m4.shape[2] != 1 else torch.zeros_like(rows)
    kk = kpos.clamp(max=m - 1) if m4.shape[3] != 1 else torch.zeros_like(kpos)
    if kk.dim() == 2:
        return m4[:, :, r[:, :, None], kk[:, None, :]]
    # per-head key positions [B',H',c,L]: gather per (b, h) with broadcasting index tensors
    bsz, hh = kk.shape[:2]
    bi = (torch.arange(bsz)[:, None, None, None, None] if m4.shape[0] != 1
          else torch.zeros(1, 1, 1, 1, 1, dtype=torch.long))
    hi = (torch.arange(hh)[None, :, None, None, None] if m4.shape[1] != 1
          else torch.zeros(1, 1, 1, 1, 1, dtype=torch.long))
    return m4[bi, hi, r[None, None, :, :, None], kk[:, :, :, None, :]]


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      scale: float, softcap: float, bm: BlockMap, lo: torch.Tensor, hi: torch.Tensor
                      ) -> torch.Tensor:
    """Attention restricted to ``bm``'s blocks and the intervals [lo, hi] (absolute key positions)."""
    bsz, h, p, e = q.shape
    g, m, f = k.shape[1], k.shape[2], v.shape[-1]
    rep = h // g
    bq, bk = bm.block_q, bm.block_k
    nq, nk = math.ceil(p / bq), math.ceil(m / bk)
    s = bm.slots
    span = s * bk
    dt = q.dtype
    kp = F.pad(k, (0, 0, 0, nk * bk - m)).view(bsz, g, nk, bk, e)
    vp = F.pad(v, (0, 0, 0, nk * bk - m)).view(bsz, g, nk, bk, f)
    qp = F.pad(q, (0, 0, 0, nq * bq - p)).view(bsz, h, nq, bq, e)
    pad = nq * bq - p
    per_head = bm.idx.dim() == 4
    if lo.dim() == 3:  # one pattern per head, [H, P, T]: its rows broadcast against the heads of the block map
        lo_p = torch.cat([lo, lo.new_ones(lo.shape[0], pad, lo.shape[-1])], 1).view(lo.shape[0], nq, bq, 1, -1)
        hi_p = torch.cat([hi, hi.new_zeros(hi.shape[0], pad, hi.shape[-1])], 1).view(hi.shape[0], nq, bq, 1, -1)
        if not per_head:
            raise ValueError("per-head intervals need a per-head block map")
    else:
        lo_p = torch.cat([lo, lo.new_ones(pad, lo.shape[1])]).view(nq, bq, 1, -1)
        hi_p = torch.cat([hi, hi.new_zeros(pad, hi.shape[1])]).view(nq, bq, 1, -1)
    valid = torch.arange(s)[None, :] < bm.num[..., None]
    heads_k = h if per_head else g
    step_bytes = 4 * bsz * (h * bq * span + heads_k * span * (e + f)) * (3 if mask is not None else 2)
    c = max(1, min(nq, _BUDGET_BYTES // max(1, step_bytes)))
    outs = []
    for q0 in range(0, nq, c):
        q1 = min(nq, q0 + c)
        cc = q1 - q0
        ar = torch.arange(bk)
        if per_head:
            ix = bm.idx[..., q0:q1, :].expand(bsz, h, cc, s)
            ok = valid[..., q0:q1, :].expand(bsz, h, cc, s)
            gi = (torch.arange(h) // rep)[None, :, None, None]
            bi = torch.arange(bsz)[:, None, None, None]
            kg = kp[bi, gi, ix].reshape(bsz, h, cc, span, e)
            vg = vp[bi, gi, ix].reshape(bsz, h, cc, span, f)
            kpos = (ix[..., None] * bk + ar).reshape(bsz, h, cc, span)
            okk = ok[..., None].expand(bsz, h, cc, s, bk).reshape(bsz, h, cc, span)
            kq = kpos[..., None, :, None]  # [B,H,c,1,L,1]
            lq, hq = (lo_p[:, q0:q1], hi_p[:, q0:q1]) if lo.dim() == 3 else (lo_p[q0:q1], hi_p[q0:q1])
            vis = ((kq >= lq) & (kq <= hq)).any(-1)
            vis &= okk[..., None, :]  # [B,H,c,bq,L]
        else:
            ix = bm.idx[q0:q1]
            kg = kp[:, :, ix].reshape(bsz, g, cc, span, e)
            vg = vp[:, :, ix].reshape(bsz, g, cc, span, f)
            kpos = (ix[..., None] * bk + ar).reshape(cc, span)
            okk = valid[q0:q1, :, None].expand(cc, s, bk).reshape(cc, span)
            kq = kpos[:, None, :, None]
            vis = ((kq >= lo_p[q0:q1]) & (kq <= hi_p[q0:q1])).any(-1)
            vis = (vis & okk[:, None, :])[None, None]  # [1,1,c,bq,L]
        bias = torch.zeros(vis.shape, dtype=dt).masked_fill_(~vis, float("-inf"))
        if mask is not None:
            rows = (torch.arange(q0, q1)[:, None] * bq + torch.arange(bq)[None, :])
            ub = _user_bias(mask, rows, kpos, p, m)
            bias = bias.masked_fill(~ub, float("-inf")) if ub.dtype == torch.bool else bias + ub.to(dt)
        qc = qp[:, :, q0:q1]
        o = _attend(qc, kg, vg, bias, scale, softcap)  # [B,H,c,bq,F]
        outs.append(o)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.reshape(bsz, h, nq * bq, f)[:, :, :p]


def _attend(qc: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, bias: torch.Tensor, scale: float,
            softcap: float) -> torch.Tensor:
    """qc [B,H,c,bq,E], kg/vg [B,G',c,L,*], bias broadcastable to [B,H,c,bq,L] -> [B,H,c,bq,F]."""
    bsz, h, c, bq, e = qc.shape
    gk, span, f = kg.shape[1], kg.shape[3], vg.shape[-1]
    rowok = (bias > float("-inf")).any(-1, keepdim=True)  # rows with no visible key give 0
    if softcap > 0:
        rep = h // gk
        qs = qc.view(bsz, gk, rep, c, bq, e)
        sc = torch.matmul(qs, kg.unsqueeze(2).transpose(-1, -2)) * scale
        sc = softcap * torch.tanh(sc / softcap)
        b6 = bias.reshape(bias.shape[0], -1, 1, c, bq, span) if bias.shape[1] == 1 else \
            bias.reshape(bias.shape[0], gk, rep, c, bq, span)
        pr = torch.softmax(sc.float() + b6.float(), dim=-1).nan_to_num(0.0).to(qc.dtype)
        o = torch.matmul(pr, vg.unsqueeze(2)).reshape(bsz, h, c, bq, f)
        return o if bool(rowok.all()) else o.masked_fill(~rowok, 0.0)
    qs = qc.permute(0, 2, 1, 3, 4).reshape(bsz * c, h, bq, e)
    ks = kg.permute(0, 2, 1, 3, 4).reshape(bsz * c, gk, span, e)
    vs = vg.permute(0, 2, 1, 3, 4).reshape(bsz * c, gk, span, f)
    bb = bias.expand(bsz, -1, -1, -1, -1) if bias.shape[0] == 1 else bias
    bb = bb.permute(0, 2, 1, 3, 4).reshape(bsz * c, bb.shape[1], bq, span)
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bb, scale=scale, enable_gqa=gk != h)
    o = o.view(bsz, c, h, bq, f).permute(0, 2, 1, 3, 4)
    if not bool(rowok.all()):
        o = o.masked_fill(~rowok, 0.0)
    return o
