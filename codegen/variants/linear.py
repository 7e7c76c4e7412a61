"""``linear``: kernelised attention out_i = Σ_j a_ij v_j / Σ_j a_ij with a_ij = φ(q_i)·φ(k_j).

Feature maps (``feature_map``):

* ``elu1``: φ(x) = elu(x) + 1 on raw q, k.
* ``taylor``: φ(q)·φ(k) = 1 + s + s²/2 with s = scale·q·k (feature dim 1 + E + E²; Based).
* ``hedgehog``: φ(x) = [softmax(xW + b) ‖ softmax(−(xW + b))] per head, with
  ``extra = [wq [H,E,Dφ], bq [H,Dφ], wk [G,E,Dφ], bk [G,Dφ]]`` (Hedgehog / LoLCATs).

``window`` > 0 mixes in softmax (Based / LoLCATs): keys with |i − j| < window (and j <= i if causal)
weigh exp(s_ij), all others φ(q_i)·φ(k_j), one shared normaliser.  Queries sit at the end of the keys.

Lowering: non-causal reduces φ(K)ᵀV to a state and applies it; causal is chunked (Lightning
Attention-2): exact quadratic inside each chunk, the state carried across chunks, in segments so
memory stays flat in N.  The window part is the sliding-window band, added as a correction.
Key-padding masks zero the hidden keys' features; query-dependent masks are refused.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from codegen.naive import HIDDEN_BELOW, as4d
from codegen.registry import KernelVariant, TritonKernel, register
from cost_model import ir
from cost_model.cascades import base_sizes, finish, size
from cost_model.ir import Access, Einsum

VARIANT = "linear"
FEATURE_MAPS = ("elu1", "taylor", "hedgehog")
_BUDGET_BYTES = 8 << 20  # per segment of queries: intermediates stay cache-sized (256 MB ran 16k tokens 1.9x slower)


def key_keep(mask: Optional[torch.Tensor], bsz: int, m: int) -> Optional[torch.Tensor]:
    """[B|1, 1, M] float 0/1 of keys a key-padding mask keeps; ValueError for any other mask."""
    if mask is None:
        return None
    m4 = as4d(mask)
    if m4.shape[1] != 1 or m4.shape[2] != 1:
        raise ValueError("linear: only key-padding masks ([B,1,1,M]) are supported, got "
                         f"{tuple(mask.shape)}")
    row = m4[:, 0, 0, :].expand(m4.shape[0], m)
    if row.dtype == torch.bool:
        return row.float()[:, None, :]
    # A huge negative fill (finfo.min, -1e9, old BERT's -10000) hides a key exactly as -inf does:
    # exp of it underflows to 0 against any real score.
    hidden = row <= HIDDEN_BELOW
    if bool((row[~hidden] != 0).any()):
        raise ValueError("linear: an additive mask must hold only 0 and hiding values (-inf, finfo.min, <= -1e4): "
                         "key padding")
    return (~hidden).float()[:, None, :]


def feature(x: torch.Tensor, which: str, scale: float, w: Optional[torch.Tensor] = None,
            b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """φ(x) for x [B, heads, N, E] (float32); w [heads,E,Dφ], b [heads,Dφ] for hedgehog."""
    if which == "elu1":
        return F.elu(x).add_(1)
    if which == "taylor":
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) * (scale / math.sqrt(2))
        return torch.cat([torch.ones_like(x[..., :1]), x * math.sqrt(scale), outer], -1)
    if which == "hedgehog":
        z = torch.einsum("bhne,hed->bhnd", x, w.float()) + b.float()[None, :, None, :]
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)
    raise ValueError(f"linear: unknown feature_map {which!r}; known: {FEATURE_MAPS}")


def _maps(which: str, extra: Sequence[torch.Tensor], h: int, g: int):
    """(q weights, k weights) for ``feature``; validates hedgehog's extra tensors."""
    if which != "hedgehog":
        return (None, None), (None, None)
    if len(extra) != 4:
        raise ValueError("linear/hedgehog: extra must be [wq [H,E,D], bq [H,D], wk [G,E,D], bk [G,D]]")
    wq, bq, wk, bk = extra
    if wq.shape[0] != h or wk.shape[0] != g:
        raise ValueError(f"linear/hedgehog: wq has {wq.shape[0]} heads (want {h}), wk {wk.shape[0]} (want {g})")
    return (wq, bq), (wk, bk)


def reference(q, k, v, mask, scale, causal, *, extra: Sequence[torch.Tensor] = (), feature_map: str = "elu1",
              window: int = 0, **_) -> torch.Tensor:
    """The explicit quadratic form Σ_j a_ij v_j / Σ_j a_ij in float64 (for tests)."""
    bsz, h, p, e = q.shape
    g, m = k.shape[1], k.shape[2]
    rep = h // g
    (wq, bq), (wk, bk) = _maps(feature_map, extra, h, g)
    qd, kd, vd = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = scale * qd @ kd.transpose(-1, -2)
    if feature_map == "taylor":
        a = 1 + s + s * s / 2
    else:
        wk_r = None if wk is None else wk.double().repeat_interleave(rep, 0)
        bk_r = None if bk is None else bk.double().repeat_interleave(rep, 0)
        fq = _feature64(qd, feature_map, wq, bq)
        fk = _feature64(kd, feature_map, wk_r, bk_r)
        a = fq @ fk.transpose(-1, -2)
    i = torch.arange(m - p, m)[:, None]
    j = torch.arange(m)[None, :]
    if window > 0:
        a = torch.where((i - j).abs() < window, s.exp(), a)
    if causal:
        a = a * (j <= i)
    keep = key_keep(mask, bsz, m)
    if keep is not None:
        a = a * keep.double()[:, :, None, :]
    out = (a @ vd) / a.sum(-1, keepdim=True)
    return out.nan_to_num(0.0).to(q.dtype)


def _feature64(x, which, w, b):
    if which == "elu1":
        return F.elu(x) + 1
    z = torch.einsum("bhne,hed->bhnd", x, w.double()) + b.double()[None, :, None, :]
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)


def _pair(which: str, scale: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Weights a_ij inside a chunk from (raw q, raw k, φ(q), φ(k)); Taylor uses 1 + s + s²/2 directly."""
    if which == "taylor":
        def taylor(qr, kr, qf, kf):
            s = scale * torch.matmul(qr, kr.transpose(-1, -2))
            return 1 + s + 0.5 * s * s
        return taylor
    return lambda qr, kr, qf, kf: torch.matmul(qf, kf.transpose(-1, -2))


def linear_attention(q, k, v, keep, scale, causal, which, qmap, kmap, chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised (numerator [B,H,P,F], denominator [B,H,P]) of the linear part over every visible key.

    Values carry an extra ones column, so one matmul gives numerator and denominator together.
    """
    bsz, h, p, e = q.shape
    g, m, f = k.shape[1], k.shape[2], v.shape[-1]
    rep = h // g
    off = m - p
    qf32, kf32 = q.float(), k.float()
    v1 = torch.cat([v.float(), torch.ones(bsz, g, m, 1)], -1)  # [B,G,M,F+1]
    f1 = f + 1

    def phi_k(lo: int, hi: int) -> torch.Tensor:
        fk = feature(kf32[:, :, lo:hi], which, scale, *kmap)
        return fk if keep is None else fk * keep[:, :, lo:hi, None]

    def phi_q(lo: int, hi: int) -> torch.Tensor:
        return feature(qf32[:, :, lo:hi], which, scale, *qmap)

    d = 1 + e + e * e if which == "taylor" else (2 * qmap[0].shape[-1] if which == "hedgehog" else e)
    per_tok = 4 * (bsz * g * d * f1 // max(1, chunk) + bsz * h * (d + 2 * chunk + f1) + bsz * g * (d + f1))
    seg = max(chunk, (_BUDGET_BYTES // max(1, per_tok)) // chunk * chunk)
    state = torch.zeros(bsz, g, d, f1)
    # keys before the first query (or, non-causal, every key) reduce to the initial state
    end = off if causal else m
    for lo in range(0, end, seg):
        hi = min(end, lo + seg)
        state += phi_k(lo, hi).transpose(-1, -2) @ v1[:, :, lo:hi]
    out = torch.empty(bsz, g, rep, p, f1)
    if not causal:
        for lo in range(0, p, seg):
            hi = min(p, lo + seg)
            out[:, :, :, lo:hi] = phi_q(lo, hi).view(bsz, g, rep, hi - lo, d) @ state[:, :, None]
        out = out.view(bsz, h, p, f1)
        return out[..., :f], out[..., f]
    pair = _pair(which, scale)
    hide = torch.ones(chunk, chunk, dtype=torch.bool).triu(1)
    for lo in range(0, p, seg):
        hi = min(p, lo + seg)
        n = math.ceil((hi - lo) / chunk)
        pad = n * chunk - (hi - lo)
        fq = phi_q(lo, hi)
        fk = phi_k(off + lo, off + hi)
        vc = v1[:, :, off + lo:off + hi]
        qr, kr = qf32[:, :, lo:hi], kf32[:, :, off + lo:off + hi]
        if pad:  # zero-padded tail keys sit after every real query: the causal mask hides them
            fq, fk, vc = F.pad(fq, (0, 0, 0, pad)), F.pad(fk, (0, 0, 0, pad)), F.pad(vc, (0, 0, 0, pad))
            qr, kr = F.pad(qr, (0, 0, 0, pad)), F.pad(kr, (0, 0, 0, pad))
        fq = fq.view(bsz, g, rep, n, chunk, d)
        fk = fk.view(bsz, g, n, chunk, d)
        vc = vc.view(bsz, g, n, chunk, f1)
        a = pair(qr.view(bsz, g, rep, n, chunk, e), kr.view(bsz, g, 1, n, chunk, e), fq, fk.unsqueeze(2))
        a.masked_fill_(hide, 0.0)  # [B,G,R,n,C,C]
        if keep is not None and which == "taylor":  # φ-based maps already zeroed hidden keys' features
            kc = F.pad(keep[:, :, off + lo:off + hi], (0, pad)).view(keep.shape[0], 1, 1, n, 1, chunk)
            a.mul_(kc)
        res = a @ vc.unsqueeze(2)  # intra-chunk [B,G,R,n,C,F+1]
        ckv = fk.transpose(-1, -2) @ vc  # [B,G,n,D,F+1]
        # exclusive prefix sum with the carried state in front: the state before each chunk
        before = torch.cumsum(torch.cat([state[:, :, None], ckv[:, :, :-1]], 2), 2)
        res += fq @ before.unsqueeze(2)
        out[:, :, :, lo:hi] = res.view(bsz, g, rep, n * chunk, f1)[:, :, :, :hi - lo]
        state = before[:, :, -1] + ckv[:, :, -1]
    out = out.view(bsz, h, p, f1)
    return out[..., :f], out[..., f]


def _window_correction(q, k, v, keep, scale, causal, which, qmap, kmap, window, num, den, block: int = 128):
    """Swap the band |i-j| < window from φ·φ weights to exp(s), stably: rescale by exp(-c_i)."""
    bsz, h, p, e = q.shape
    g, m, f = k.shape[1], k.shape[2], v.shape[-1]
    rep = h // g
    off = m - p
    pair = _pair(which, scale)
    out = torch.empty(bsz, h, p, f)
    for q0 in range(0, p, block):
        q1 = min(p, q0 + block)
        k0 = max(0, off + q0 - window + 1)
        k1 = min(m, (off + q1) if causal else off + q1 - 1 + window)
        qr = q[:, :, q0:q1].float().view(bsz, g, rep, q1 - q0, e)
        kr = k[:, :, k0:k1].float().unsqueeze(2)
        s = scale * qr @ kr.transpose(-1, -2)
        i = torch.arange(off + q0, off + q1)[:, None]
        j = torch.arange(k0, k1)[None, :]
        band = (i - j).abs() < window
        if causal:
            band &= j <= i
        if keep is not None:
            band = band & (keep[:, :, k0:k1] > 0)[:, :, None, None, :]
        fq = feature(q[:, :, q0:q1].float(), which, scale, *qmap).view(bsz, g, rep, q1 - q0, -1)
        fk = feature(k[:, :, k0:k1].float(), which, scale, *kmap).unsqueeze(2)
        a = pair(qr, kr, fq, fk)
        c = s.masked_fill(~band, float("-inf")).amax(-1, keepdim=True).clamp(min=0)
        w = torch.where(band, (s - c).exp() - (-c).exp() * a, torch.zeros(()))
        n_ = num[:, :, q0:q1].view(bsz, g, rep, q1 - q0, f) * (-c).exp() + w @ v[:, :, k0:k1].float().unsqueeze(2)
        d_ = den[:, :, q0:q1].view(bsz, g, rep, q1 - q0, 1) * (-c).exp() + w.sum(-1, keepdim=True)
        out[:, :, q0:q1] = (n_ / d_).reshape(bsz, h, q1 - q0, f)
    return out


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, feature_map: str = "elu1", chunk: int = 64, window: int = 0
           ) -> torch.Tensor:
    """Linear attention: state reduction (non-causal) or chunked recurrence (causal), plus the window."""
    if softcap > 0:
        raise ValueError("linear: softcap is not supported")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear: unknown feature_map {feature_map!r}; known: {FEATURE_MAPS}")
    fused = feature_map == "elu1" and int(window) <= 0
    if fused and (q.is_cuda or q.device.type == "cpu" and os.environ.get("REWRITER_TRITON") == "force"):
        from codegen.triton import maybe_run  # late: Triton is optional
        out = maybe_run(VARIANT, q, k, v, mask, scale, causal, 0.0, None,
                        {"feature_map": feature_map, "chunk": int(chunk)})
        if out is not None:
            return out
    bsz, h = q.shape[:2]
    g, m = k.shape[1], k.shape[2]
    qmap, kmap = _maps(feature_map, extra, h, g)
    keep = key_keep(mask, bsz, m)
    num, den = linear_attention(q, k, v, keep, scale, causal, feature_map, qmap, kmap, max(1, int(chunk)))
    if int(window) > 0:
        out = _window_correction(q, k, v, keep, scale, causal, feature_map, qmap, kmap, int(window), num, den)
    else:
        out = num / den[..., None]
    if keep is not None:  # a row whose every key is padding has 0/0: give 0
        out = out.nan_to_num(0.0)
    return out.to(q.dtype)


def _spec_params(params: dict) -> dict:
    window = int(params.get("window", 0) or 0)
    return {"feature_map": params.get("feature_map", "elu1"), "chunk": int(params.get("chunk", 64)),
            **({"window": window} if window > 0 else {})}


def _fused(params) -> bool:
    """The generated kernel fuses elu+1 without a window; other maps run the PyTorch path."""
    return params.get("feature_map", "elu1") == "elu1" and int(params.get("window", 0) or 0) <= 0


def cascade(*, causal: bool = False, chunk: object = 64, schedule: str = "fused", form: str = "online",
           tile_q: object = 64, tile_k: object = 64) -> ir.Cascade:
    """Linear attention with feature map phi (elu+1): phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1).

    Causal form is chunked as in flash-linear-attention: exact inside a chunk of C keys,
    a running state carried across chunks (iterative rank c).
    """
    if not causal:
        ops = [
            Einsum(Access("QF", ("b", "g", "r", "p", "e")), (Access("Q", ("b", "g", "r", "p", "e")),), ("phi",)),
            Einsum(Access("KF", ("b", "g", "m", "e")), (Access("K", ("b", "g", "m", "e")),), ("phi",)),
            Einsum(Access("KV", ("b", "g", "e", "f")), (Access("KF", ("b", "g", "m", "e")),
                                                        Access("V", ("b", "g", "m", "f"))), ("mul",), ("m",), "sum"),
            Einsum(Access("KS", ("b", "g", "e")), (Access("KF", ("b", "g", "m", "e")),), (), ("m",), "sum"),
            Einsum(Access("NUM", ("b", "g", "r", "p", "f")), (Access("QF", ("b", "g", "r", "p", "e")),
                                                              Access("KV", ("b", "g", "e", "f"))),
                   ("mul",), ("e",), "sum"),
            Einsum(Access("DEN", ("b", "g", "r", "p")), (Access("QF", ("b", "g", "r", "p", "e")),
                                                         Access("KS", ("b", "g", "e"))), ("mul",), ("e",), "sum"),
            Einsum(Access("AV", ("b", "g", "r", "p", "f")), (Access("NUM", ("b", "g", "r", "p", "f")),
                                                             Access("DEN", ("b", "g", "r", "p"))), ("div",)),
        ]
        groups = [[e.name] for e in ops]
        return finish(VARIANT, ops, base_sizes(), ("Q", "K", "V"), [], [], groups, schedule,
                       notes="non-causal, phi(K)^T V state", params={"chunk": chunk})
    c = size(chunk)
    qa = Access("Q", ("b", "g", "r", "c", "i", "e"))
    qf = Access("QF", ("b", "g", "r", "c", "i", "e"))
    kf = Access("KF", ("b", "g", "c", "j", "e"))
    vv = Access("V", ("b", "g", "c", "j", "f"))
    ops = [
        Einsum(qf, (qa,), ("phi",)),
        Einsum(kf, (Access("K", ("b", "g", "c", "j", "e")),), ("phi",)),
        Einsum(Access("IS", ("b", "g", "r", "c", "i", "j")), (qf, kf), ("mul",), ("e",), "sum"),
        # causal inside the chunk: computed in full, then masked
        Einsum(Access("ISM", ("b", "g", "r", "c", "i", "j")), (Access("IS", ("b", "g", "r", "c", "i", "j")),
                                                              Access("TRIL", ("i", "j"))), ("mul",)),
        Einsum(Access("INTRA", ("b", "g", "r", "c", "i", "f")), (Access("ISM", ("b", "g", "r", "c", "i", "j")), vv),
               ("mul",), ("j",), "sum"),
        Einsum(Access("INTRAD", ("b", "g", "r", "c", "i")), (Access("ISM", ("b", "g", "r", "c", "i", "j")),), (),
               ("j",), "sum"),
        Einsum(Access("CKV", ("b", "g", "c", "e", "f")), (kf, vv), ("mul",), ("j",), "sum"),
        Einsum(Access("CKS", ("b", "g", "c", "e")), (kf,), (), ("j",), "sum"),
        Einsum(Access("S", ("b", "g", "c+1", "e", "f")), (Access("S", ("b", "g", "c", "e", "f")),
                                                          Access("CKV", ("b", "g", "c", "e", "f"))), ("add",)),
        Einsum(Access("Z", ("b", "g", "c+1", "e")), (Access("Z", ("b", "g", "c", "e")),
                                                     Access("CKS", ("b", "g", "c", "e"))), ("add",)),
        Einsum(Access("INTER", ("b", "g", "r", "c", "i", "f")), (qf, Access("S", ("b", "g", "c", "e", "f"))),
               ("mul",), ("e",), "sum"),
        Einsum(Access("INTERD", ("b", "g", "r", "c", "i")), (qf, Access("Z", ("b", "g", "c", "e"))),
               ("mul",), ("e",), "sum"),
        Einsum(Access("NUM", ("b", "g", "r", "c", "i", "f")), (Access("INTRA", ("b", "g", "r", "c", "i", "f")),
                                                               Access("INTER", ("b", "g", "r", "c", "i", "f"))),
               ("add",)),
        Einsum(Access("DEN", ("b", "g", "r", "c", "i")), (Access("INTRAD", ("b", "g", "r", "c", "i")),
                                                          Access("INTERD", ("b", "g", "r", "c", "i"))), ("add",)),
        Einsum(Access("AV", ("b", "g", "r", "c", "i", "f")), (Access("NUM", ("b", "g", "r", "c", "i", "f")),
                                                              Access("DEN", ("b", "g", "r", "c", "i"))), ("div",)),
    ]
    sizes = [("b", ir.B), ("g", ir.G), ("r", ir.H / ir.G), ("c", ir.M / c), ("i", c), ("j", c), ("e", ir.E),
             ("f", ir.F), ("m", ir.M)]
    groups = [[e.name] for e in ops]
    return finish(VARIANT, ops, sizes, ("Q", "K", "V", "TRIL"), [], ["c"], groups, schedule, key="m",
                   derived=("c", "j"), tile_ranks=("i",), tile_q=c, tile_k=c,
                   notes="causal, chunked (exact in chunk, carried state)",
                   params={"chunk": c})


PROBE = "extra_probe"


def _with_extra(q, k, v, mask, scale, causal, *, extra=(), softcap=0.0, fill=None, probe: str = "", inner: str = "",
                **params):
    """Planning only: the ``inner`` variant with the fitted tensors looked up by ``probe`` as its extra tensors."""
    from codegen.lowrank import PROBES
    from codegen.ops import run

    return run(inner, q, k, v, mask, scale, causal, extra=list(PROBES[probe]), softcap=softcap, fill=fill, **params)


KERNEL = register(KernelVariant(
    name=VARIANT, kernel=kernel, reference=reference,
    supports=frozenset({"padding_mask", "gqa"}), probes={PROBE: _with_extra},
    triton=TritonKernel("recurrent", ("feature_map", "chunk", "window"), spec_params=_spec_params, available=_fused),
    timing=lambda n: {"chunk": 64}, cascade=cascade, cascade_params={"chunk": int},
    examples=lambda n: [{"feature_map": "elu1", "chunk": 16}, {"feature_map": "elu1", "chunk": 5, "window": 3},
                        {"feature_map": "taylor", "chunk": 8, "window": 4}],
    degenerate=lambda n, e: {"feature_map": "elu1", "chunk": 16, "window": n}))
