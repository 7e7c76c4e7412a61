"""``linear``: kernelised attention phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1), phi = elu + 1.

Non-causal: one phi(K)^T V state per KV head, then a matmul per query.  Causal: chunked as in
flash-linear-attention with chunk C: exact (phi(Q_c) phi(K_c)^T masked lower-triangular) inside
a chunk, plus phi(Q_c) times the state carried from all earlier chunks.  Queries sit at the
end of the keys (query i at position M - P + i); keys before the first query enter the state.
``scale`` is accepted for a uniform signature; the feature map is applied to raw q and k.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from passes.variants._grid import modifier_reason, powers_below

CASCADE = "linear"
DEFAULTS: dict = {"chunk": 64, "feature_map": "elu1", "window": 0}
PARAMS: dict = {"feature_map": str, "window": int, "chunk": int}
FEATURE_MAPS = ("elu1", "taylor", "hedgehog")


def applies(site) -> Optional[str]:
    """Linear attention needs keys that are only padded or causally hidden; returns a reason if not."""
    if site.q_len < 0 or site.kv_len < 0:
        return "the lengths are not known"
    if site.q_len > site.kv_len:
        return "more queries than keys"
    if site.window is not None:
        return "the site's own band mask is not a key-padding mask, the only mask the linear kernel takes"
    return modifier_reason(site, softcap=False, masks=("none", "causal", "padding"))


def grid(site) -> list[dict]:
    """Feature maps to try: Taylor or a learned (Hedgehog) map with a softmax window, and plain elu+1."""
    out: list[dict] = []
    for w in powers_below(site.kv_len, lo=32, hi=256):
        if site.head_dim <= 64:  # the Taylor map has 1 + d + d² features
            out.append({"feature_map": "taylor", "window": w, "chunk": 64})
    # A learned map is fitted to the normalised attention weights, which is the kernel's pure linear form;
    # combined with a softmax window its features (at most 2 in φ(q)·φ(k)) cannot match exp(s) in scale.
    out.append({"feature_map": "hedgehog", "window": 0, "chunk": 64})
    out.append({"feature_map": "elu1", "window": 0, "chunk": 64})
    return out


def feature_dim(site, params: dict) -> int:
    """Width of the feature map the variant prices: φ(q)·φ(k) runs over this many features."""
    fm = params.get("feature_map", "elu1")
    d = site.head_dim
    if fm == "taylor":
        return 1 + d + d * d
    if fm == "hedgehog":
        return 2 * d
    return d


def exact(site, params: dict) -> bool:
    """True when the softmax window covers every key."""
    return int(params.get("window", 0)) >= max(site.q_len, site.kv_len)

def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    if params.get("feature_map", "elu1") not in FEATURE_MAPS:
        raise ValueError(f"linear: feature_map must be one of {', '.join(FEATURE_MAPS)}, not {params['feature_map']!r}")
    if params.get("chunk", 1) < 1 or params.get("window", 0) < 0:
        raise ValueError("linear: chunk must be >= 1 and window >= 0")


def elu1(x: torch.Tensor) -> torch.Tensor:
    """The feature map elu(x) + 1 (positive, so the normaliser never vanishes)."""
    return torch.nn.functional.elu(x) + 1


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
              chunk: int = DEFAULTS["chunk"],
              feature_map: Callable[[torch.Tensor], torch.Tensor] = elu1) -> torch.Tensor:
    """Linear attention, q [B,H,P,E], k [B,G,M,E], v [B,G,M,F] -> [B,H,P,F]."""
    bsz, h, p, e = q.shape
    g, m, f = k.shape[1], k.shape[2], v.shape[-1]
    r = h // g
    qf = feature_map(q).view(bsz, g, r, p, -1)
    kf = feature_map(k)
    if not causal:
        kv = torch.matmul(kf.transpose(-1, -2), v)  # [B,G,D,F]
        ks = kf.sum(dim=-2)  # [B,G,D]
        num = torch.matmul(qf, kv.unsqueeze(2))
        den = torch.matmul(qf, ks[:, :, None, :, None])
        return (num / den).reshape(bsz, h, p, f)
    off = m - p
    d = kf.shape[-1]
    s0 = torch.matmul(kf[:, :, :off].transpose(-1, -2), v[:, :, :off])  # keys before the first query
    z0 = kf[:, :, :off].sum(dim=-2)
    n = math.ceil(p / chunk)
    pad = n * chunk - p
    # pad after the feature map: a padded key must add nothing to any state
    qc = torch.nn.functional.pad(qf, (0, 0, 0, pad)).view(bsz, g, r, n, chunk, d)
    kc = torch.nn.functional.pad(kf[:, :, off:], (0, 0, 0, pad)).view(bsz, g, n, chunk, d)
    vc = torch.nn.functional.pad(v[:, :, off:], (0, 0, 0, pad)).view(bsz, g, n, chunk, f)
    tril = torch.ones(chunk, chunk, dtype=q.dtype, device=q.device).tril()
    intra = torch.matmul(qc, kc.unsqueeze(2).transpose(-1, -2)).mul_(tril)  # [B,G,R,n,C,C]
    num = torch.matmul(intra, vc.unsqueeze(2))
    den = intra.sum(dim=-1)
    ckv = torch.matmul(kc.transpose(-1, -2), vc)  # [B,G,n,D,F]
    cks = kc.sum(dim=-2)  # [B,G,n,D]
    state = torch.cumsum(ckv, dim=2) - ckv + s0[:, :, None]  # state before each chunk
    zs = torch.cumsum(cks, dim=2) - cks + z0[:, :, None]
    num = num + torch.matmul(qc, state.unsqueeze(2))
    den = den + torch.matmul(qc, zs.unsqueeze(2).unsqueeze(-1)).squeeze(-1)
    out = (num / den[..., None]).reshape(bsz, g, r, n * chunk, f)[:, :, :, :p]
    return out.reshape(bsz, h, p, f)
