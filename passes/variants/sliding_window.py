"""``sliding_window``: key j is visible to query i when |i - j| < W (and j <= i if causal).

The reference computes by query blocks of ``block`` rows: each block reads only its span of
``block + W - 1`` keys (``block + 2W - 2`` if not causal) through an overlapping strided view
of K and V, so a window of W touches about P·(W + block) keys, never a dense P·M.  Queries sit
at the end of the keys (query i is at absolute position M - P + i), so decode sees the last W.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from passes.variants._grid import modifier_reason, sequence_reason, windows, with_delta

CASCADE = "sliding_window"
DEFAULTS: dict = {"window": 256, "block": 64}
PARAMS: dict = {"window": int, "block": int, "delta": int}
EXACT_WHEN = "the site's own mask is a band of the same window"


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


def _spans(x: torch.Tensor, start: int, n_blocks: int, block: int, span: int) -> torch.Tensor:
    """View [B, G, n_blocks, span, D] of x [B, G, L, D] whose block j starts at row start + j*block."""
    x = x.contiguous()
    b, g, _, d = x.shape
    s = x.stride()
    return x.as_strided((b, g, n_blocks, span, d), (s[0], s[1], block * s[2], s[2], s[3]),
                        x.storage_offset() + start * s[2])


@functools.lru_cache(maxsize=32)
def _bias(p: int, m: int, window: int, sinks: int, block: int, causal: bool, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """Additive mask [blocks, block, sinks + span] (0 visible, -inf hidden); built once per shape."""
    off = m - p
    nb = math.ceil(p / block)
    span = block + window - 1 if causal else block + 2 * window - 2
    blk = torch.arange(nb, device=device)[:, None, None]
    qpos = off + blk * block + torch.arange(block, device=device)[None, :, None]
    kpos = off + blk * block - (window - 1) + torch.arange(span, device=device)[None, None, :]
    vis = (kpos >= 0) & (kpos < m) & ((qpos - kpos).abs() < window) & (kpos >= sinks)
    if causal:
        vis &= kpos <= qpos
    if sinks:
        spos = torch.arange(min(sinks, m), device=device)[None, None, :]
        svis = (spos <= qpos) if causal else torch.ones_like(spos <= qpos)
        vis = torch.cat([svis.expand(nb, block, spos.shape[-1]), vis], dim=-1)
    return torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                    window: int, sinks: int = 0, block: int = 64) -> torch.Tensor:
    """Blocked sliding-window attention with optional attention sinks (the first ``sinks`` keys)."""
    bsz, h, p, e = q.shape
    g, m, f = k.shape[1], k.shape[2], v.shape[-1]
    r = h // g
    if window < 1 or block < 1 or sinks < 0:
        raise ValueError("window and block must be >= 1 and sinks >= 0")
    off = m - p
    nb = math.ceil(p / block)
    pp = nb * block
    span = block + window - 1 if causal else block + 2 * window - 2
    front = window - 1
    # block j's span starts at absolute key off + j*block - (W-1), i.e. padded row off + j*block
    need = off + (nb - 1) * block + span
    back = max(0, need - front - m)
    dt = q.dtype
    kp = torch.nn.functional.pad(k, (0, 0, front, back))
    vp = torch.nn.functional.pad(v, (0, 0, front, back))
    kw, vw = _spans(kp, off, nb, block, span), _spans(vp, off, nb, block, span)
    bias = _bias(p, m, window, sinks, block, causal, dt, q.device)
    if sinks:
        ns = min(sinks, m)
        ks = k[:, :, :ns].unsqueeze(2).expand(bsz, g, nb, ns, e)
        vs = v[:, :, :ns].unsqueeze(2).expand(bsz, g, nb, ns, f)
        kw, vw = torch.cat([ks, kw], dim=-2), torch.cat([vs, vw], dim=-2)
    qs = torch.nn.functional.pad(q * scale, (0, 0, 0, pp - p))
    # rows of the R query heads sharing a KV head are stacked so one matmul serves them all
    qb = qs.view(bsz, g, r, nb, block, e).permute(0, 1, 3, 2, 4, 5).reshape(bsz, g, nb, r * block, e)
    s = torch.matmul(qb, kw.transpose(-1, -2))
    s.view(bsz, g, nb, r, block, -1).add_(bias[:, None])
    a = torch.softmax(s, dim=-1)
    o = torch.matmul(a, vw)
    o = o.view(bsz, g, nb, r, block, f).permute(0, 1, 3, 2, 4, 5).reshape(bsz, h, pp, f)
    return o[:, :, :p]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
              window: int = DEFAULTS["window"], block: int = DEFAULTS["block"]) -> torch.Tensor:
    """Sliding-window attention, q [B,H,P,E], k [B,G,M,E], v [B,G,M,F] -> [B,H,P,F]."""
    return local_attention(q, k, v, scale=scale, causal=causal, window=window, block=block)
