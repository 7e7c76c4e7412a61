"""Host side of the generated Triton kernels: spec of a call, block maps, strides, grid, launch."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from codegen.naive import as4d
from codegen.spec import KernelSpec, mask_kind
from codegen.triton.gen import load, triton_of

logger = logging.getLogger(__name__)

# Tile used under the interpreter (tiny test shapes: several blocks even at N ~ 40) and the
# nominal tile recorded in a CUDA spec of the ranges family (the autotuner picks the real one).
INTERPRET_BLOCK = 16
CUDA_BLOCK = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_TUNED: dict[str, Any] = {}


def interpreting() -> bool:
    """True when Triton runs kernels with its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _spec_params(variant: str, params: dict) -> dict:
    """The parameters ``variant``'s spec keeps, normalised; a ValueError naming any it does not know."""
    rec, tri = triton_of(variant)
    keep = tri.params
    out = {k: params[k] for k in keep if k in params}
    if tri.spec_params is not None:
        out = tri.spec_params(out)
    unknown = set(params) - set(keep) - {"block"} - set(rec.surgery_params)
    if unknown:
        raise ValueError(f"{variant}: unknown parameters for the Triton kernel: {sorted(unknown)}")
    return out


def call_spec(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              causal: bool, softcap: float, params: dict, block_q: Optional[int] = None,
              block_k: Optional[int] = None, extra: Sequence[torch.Tensor] = ()) -> KernelSpec:
    """The spec a call runs under (dims, dtype, flags, parameters, tile)."""
    _, tri = triton_of(variant)
    sp = _spec_params(variant, params)
    if tri.family == "blockmap":
        bq = bk = int(sp["block"])
    elif tri.family == "recurrent":
        bq = bk = max(16, 1 << (max(1, int(sp["chunk"])) - 1).bit_length())
    else:
        default = INTERPRET_BLOCK if q.device.type == "cpu" else CUDA_BLOCK
        bq, bk = int(block_q or default), int(block_k or default)
    f = int(v.shape[-1])
    if tri.low_rank:  # k/v are rank R; the output dim is the V up-projection's
        if len(extra) != 2:
            raise ValueError(f"{variant}: extra must be [uk [G,R,E], uv [G,R,F]]")
        sp = {"rank": int(k.shape[-1])}
        f = int(extra[1].shape[-1])
    return KernelSpec.make(
        variant, sp, dtype=str(q.dtype).replace("torch.", ""), head_dim=int(q.shape[-1]),
        value_dim=f, gqa=int(q.shape[1] // k.shape[1]), causal=bool(causal),
        mask=mask_kind(mask), softcap=softcap > 0, block_q=bq, block_k=bk)


def spec_from_fields(variant: str, params: dict, **fields: Any) -> KernelSpec:
    """The CUDA spec of ``variant`` with ``params`` and explicit spec ``fields`` (for artifacts)."""
    sp = _spec_params(variant, dict(params))
    family = triton_of(variant)[1].family
    if family == "blockmap":
        fields = {**fields, "block_q": sp["block"], "block_k": sp["block"]}
    elif family == "recurrent":
        c = max(16, 1 << (max(1, int(sp["chunk"])) - 1).bit_length())
        fields = {**fields, "block_q": c, "block_k": c}
    else:
        fields = {"block_q": CUDA_BLOCK, "block_k": CUDA_BLOCK, **fields}
    return KernelSpec.make(variant, sp, **fields)


def _check(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """Refuse what the kernels do not handle, before anything is compiled."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, heads, N, D]")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"Triton kernels take one dtype among {DTYPES}; got {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"bad head/length layout q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if not triton_of(variant)[1].low_rank and q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims above {MAX_HEAD_DIM} are not supported")
    dev = q.device
    if dev.type == "cpu" and not interpreting():
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if k.device != dev or v.device != dev or (mask is not None and mask.device != dev):
        raise ValueError("q, k, v and mask must be on one device")


def _block_map(variant: str, sp: dict, q: torch.Tensor, k: torch.Tensor, causal: bool,
               mask: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """(num [B|1,H|1,nq], idx [..,nq,S], full [..,nq,S]) of a block-map variant, on q's device."""
    from codegen.pattern import cached_block_map
    from codegen.sparse import freeze_params
    p, m, blk = q.shape[2], k.shape[2], int(sp["block"])
    chooser = triton_of(variant)[1].block_map
    if chooser is not None:  # chosen per call (on q's device; never a hidden tile)
        bm = chooser(sp, q, k, causal, mask, scale)
    else:
        params = {kk: vv for kk, vv in sp.items() if kk != "block"}
        bm = cached_block_map(variant, freeze_params(params), p, m, bool(causal), blk, blk)[0]
    num, idx, full = bm.num, bm.idx, bm.full
    while num.dim() < 3:
        num, idx, full = num[None], idx[None], full[None]
    dev = q.device
    return (num.to(dev, torch.int32).contiguous(), idx.to(dev, torch.int32).contiguous(),
            full.to(dev, torch.uint8).contiguous())


def _kernel(spec: KernelSpec, mod):
    """The jit kernel itself under the interpreter; on CUDA wrapped once in its autotuner."""
    if interpreting():
        return mod.attention_kernel
    fn = _TUNED.get(spec.hash)
    if fn is None:
        import triton
        fn = triton.autotune(configs=mod.CONFIGS, key=mod.AUTOTUNE_KEY)(mod.attention_kernel)
        _TUNED[spec.hash] = fn
    return fn


@dataclass(frozen=True)
class Launch:
    """One ready kernel launch: ``kernel[grid](*args, **kwargs)`` writes ``out``."""

    spec: KernelSpec
    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict
    out: torch.Tensor


def prepare(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
            scale: Optional[float] = None, causal: bool = False, *, softcap: float = 0.0,
            fill: Optional[float] = None, out: Optional[torch.Tensor] = None, block_q: Optional[int] = None,
            block_k: Optional[int] = None, extra: Sequence[torch.Tensor] = (), **params) -> Launch:
    """Spec, kernel, grid and arguments of one call."""
    _check(variant, q, k, v, mask)
    spec = call_spec(variant, q, k, v, mask, causal, softcap, params, block_q, block_k, extra)
    mod = load(spec)
    bsz, h, p, e = q.shape
    m, f = k.shape[2], spec.value_dim
    if scale is None:
        scale = e ** -0.5
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty(bsz, h, p, f, device=q.device, dtype=q.dtype)
    elif tuple(out.shape) != (bsz, h, p, f) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a [B,H,P,F] {q.dtype} tensor with a contiguous last dim")
    _, tri = triton_of(variant)
    if tri.family == "recurrent":
        return _prepare_linear(spec, mod, q, k, v, mask, softcap, out)
    has_mask = mask is not None
    mask_bool = has_mask and mask.dtype == torch.bool
    if has_mask:
        m4 = as4d(mask)
        if mask_bool:
            m4 = m4.view(torch.uint8)  # same bytes; Triton reads int1 pointers poorly across versions
        m4 = m4.expand(bsz, h, p, m)
        mstr = m4.stride()
    else:
        m4, mstr = q, (0, 0, 0, 0)
    args: list[Any] = [q, k, v, out, m4]
    if tri.family == "blockmap":
        num, idx, full = _block_map(variant, dict(spec.params), q, k, causal, mask, scale)
        num_e = num.expand(bsz, h, num.shape[-1])
        idx_e = idx.expand(bsz, h, *idx.shape[-2:])
        full_e = full.expand(bsz, h, *full.shape[-2:])
        args += [num_e, idx_e, full_e, *num_e.stride(), *idx_e.stride()[:3]]
    elif tri.low_rank:
        uk, uv = (x.to(device=q.device, dtype=q.dtype) for x in extra)
        uk, uv = (x if x.stride(-1) == 1 else x.contiguous() for x in (uk, uv))
        g, r = k.shape[1], k.shape[-1]
        if tuple(uk.shape[:2]) != (g, r) or tuple(uv.shape[:2]) != (g, r) or uk.shape[-1] != e:
            raise ValueError(f"{variant}: uk {tuple(uk.shape)} / uv {tuple(uv.shape)} do not match G={g}, R={r}, E={e}")
        args += [uk, uv, uk.stride(0), uk.stride(1), uv.stride(0), uv.stride(1)]
    args += [float(scale), float(softcap) if softcap > 0 else 1.0, float(fill) if fill is not None else 0.0,
             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mstr, h, p, m]
    kwargs = dict(HAS_MASK=has_mask, MASK_BOOL=mask_bool, HAS_FILL=bool(mask_bool and fill is not None))
    kern = _kernel(spec, mod)
    if interpreting():
        kwargs.update(mod.INTERPRET_CONFIG)
        grid: Any = (triton_cdiv(p, mod.INTERPRET_CONFIG["BLOCK_M"]), bsz * h)
    else:
        def grid(meta):
            return (triton_cdiv(p, meta["BLOCK_M"]), bsz * h)
    return Launch(spec, kern, grid, tuple(args), kwargs, out)


def _prepare_linear(spec: KernelSpec, mod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: Optional[torch.Tensor], softcap: float, out: torch.Tensor) -> Launch:
    """The linear kernel's launch: one program per (batch, head); key-padding masks only."""
    from codegen.variants.linear import key_keep
    if softcap > 0:
        raise ValueError("linear: softcap is not supported")
    bsz, h, p, _ = q.shape
    m = k.shape[2]
    keep = key_keep(mask, bsz, m)  # ValueError for anything but a key-padding mask
    if keep is None:
        keep_t, skeep = q, 0
    else:
        keep_t = keep.reshape(keep.shape[0], m).to(q.device, torch.float32).contiguous()
        skeep = keep_t.stride(0) if keep_t.shape[0] > 1 else 0
    args = (q, k, v, out, keep_t, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], skeep,
            h, p, m)
    return Launch(spec, _kernel(spec, mod), (bsz * h,), args, {"HAS_KEEP": keep is not None}, out)


def run(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
        scale: Optional[float] = None, causal: bool = False, *, softcap: float = 0.0,
        fill: Optional[float] = None, out: Optional[torch.Tensor] = None, block_q: Optional[int] = None,
        block_k: Optional[int] = None, extra: Sequence[torch.Tensor] = (), **params) -> torch.Tensor:
    """Run ``variant``'s generated Triton kernel (no fallback: any failure raises)."""
    job = prepare(variant, q, k, v, mask, scale, causal, softcap=softcap, fill=fill, out=out, block_q=block_q,
                  block_k=block_k, extra=extra, **params)
    if job.out.numel():
        job.kernel[job.grid](*job.args, **job.kwargs)
    return job.out


def triton_cdiv(a: int, b: int) -> int:
    """Ceil division (kept here so the host side needs no Triton import for it)."""
    return -(-a // b)
