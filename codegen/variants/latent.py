"""``latent``: attention over low-rank K/V with the up-projections fused.

k = CK [B,G,M,R], v = CV [B,G,M,R], ``extra = [uk [G,R,E], uv [G,R,F]]``:
scores = scale·(q·ukᵀ)·CKᵀ and output = (softmax·CV)·uv, i.e. exact attention at head dim R
between the two projections.  Masks, softcap, fill and ``causal`` (top-left, as the dense op)
behave as in ``dense``, which runs the rank-R attention.

With ``rope`` (``half`` or ``interleaved``, see ``codegen.rotary``) the keys were rotated after their
projection: ``extra = [uk, uv, cos, sin]`` (cos/sin broadcastable to [B, G, M, E]) and K = rope(CK·UK) is
rebuilt inside the op (the rotation does not commute with UK), then attended at head dim E; values stay
rank R with UV applied to the output. The Triton kernel does not take the rotation: that path runs in torch.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from codegen import rotary
from codegen.pattern import EVERY_KEY
from codegen.registry import KernelVariant, TritonKernel, register
from codegen.variants import dense as _dense
from codegen.variants.dense import dense
from codegen.variants.dense import reference as dense_reference
from cost_model import ir
from cost_model.cascades import base_sizes, core, finish, size
from cost_model.ir import Access, Einsum, Predicate, sym

VARIANT = "latent"


def _factors(extra: Sequence[torch.Tensor], g: int, r: int, rope: Optional[str] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if rope and rope not in rotary.FORMS:
        raise ValueError(f"latent: rope must be one of {rotary.FORMS}, not {rope!r}")
    if len(extra) != (4 if rope else 2):
        raise ValueError("latent: extra must be [uk [G,R,E], uv [G,R,F]]" + (", cos, sin" if rope else ""))
    uk, uv = extra[:2]
    if uk.shape[0] != g or uk.shape[1] != r or uv.shape[:2] != uk.shape[:2]:
        raise ValueError(f"latent: uk {tuple(uk.shape)} / uv {tuple(uv.shape)} do not match G={g}, R={r}")
    return uk, uv


def reference(q, ck, cv, mask, scale, causal, *, extra: Sequence[torch.Tensor], softcap: float = 0.0,
              fill: Optional[float] = None, rope: Optional[str] = None, **_) -> torch.Tensor:
    """Rebuild K = rope(CK·UK) and V = CV·UV in float64, then plain dense attention (for tests)."""
    uk, uv = _factors(extra, ck.shape[1], ck.shape[-1], rope)
    k = ck.double() @ uk.double()[None]
    if rope:
        k = rotary.apply(k, extra[2].double(), extra[3].double(), rope)
    v = cv.double() @ uv.double()[None]
    return dense_reference(q.double(), k, v, mask, scale, causal, softcap=softcap, fill=fill).to(q.dtype)


def kernel(q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, rank: Optional[int] = None, rope: Optional[str] = None) -> torch.Tensor:
    """Rank-R attention: project q down by uk, attend over CK/CV, project the output up by uv (with ``rope``:
    K = rope(CK·UK) is rebuilt and attended at head dim E)."""
    bsz, h, p, e = q.shape
    g, r = ck.shape[1], ck.shape[-1]
    uk, uv = _factors(extra, g, r, rope)
    if rank is not None and int(rank) != r:
        raise ValueError(f"latent: rank={rank} but the factors have rank {r}")
    rep = h // g
    if rope:  # the rotation sits between CK·UK and the scores: rebuild K, keep V low rank (torch path)
        k = rotary.apply(torch.matmul(ck, uk.to(ck.dtype)[None]), extra[2], extra[3], rope).to(q.dtype)
        ol = dense(q, k, cv.to(q.dtype), mask, scale, causal, softcap=softcap, fill=fill)
        out = torch.matmul(ol.view(bsz, g, rep, p, r), uv.to(q.dtype)[None, :, None])
        return out.reshape(bsz, h, p, -1)
    if q.is_cuda or q.device.type == "cpu" and os.environ.get("REWRITER_TRITON") == "force":
        from codegen.triton import maybe_run  # late: Triton is optional; up-projections fused in the kernel
        out = maybe_run(VARIANT, q, ck, cv, mask, scale, causal, softcap, fill, {"rank": r}, extra=[uk, uv])
        if out is not None:
            return out
    ql = torch.matmul(q.view(bsz, g, rep, p, e), uk.to(q.dtype).transpose(-1, -2)[None, :, None])
    ol = dense(ql.reshape(bsz, h, p, r), ck, cv, mask, scale, causal, softcap=softcap, fill=fill)
    out = torch.matmul(ol.view(bsz, g, rep, p, r), uv.to(q.dtype)[None, :, None])
    return out.reshape(bsz, h, p, -1)


def _output_dim(v: torch.Tensor, extra: Sequence[torch.Tensor]) -> int:
    """Values are low rank; the output is up-projected to uv's F."""
    return int(extra[1].shape[-1]) if len(extra) in (2, 4) else int(v.shape[-1])


def _operands(k: torch.Tensor, v: torch.Tensor, params: dict, gen: torch.Generator) -> tuple:
    """Rank-R K/V and their up-projections from full K/V: orthonormal bases (identity at full rank)."""
    g, e, f = k.shape[1], k.shape[-1], v.shape[-1]
    r = int(params["rank"])

    def basis(d: int) -> torch.Tensor:
        if r >= d:
            return torch.eye(d, dtype=k.dtype).expand(g, d, d).contiguous()
        a = torch.randn(g, d, r, generator=gen, dtype=torch.float64)
        return torch.linalg.qr(a).Q.transpose(-1, -2).to(k.dtype).contiguous()  # [G, R, D] orthonormal rows

    uk, uv = basis(e), basis(f)
    extra = [uk, uv]
    form = params.get("rope")
    if form:  # k arrives rotated: keys before the rotation are what is factored; cos/sin of positions 0..M-1
        m = k.shape[2]
        inv = 1.0 / (100.0 ** (torch.arange(0, e, 2, dtype=torch.float64) / e))
        ang = torch.arange(m, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat((ang, ang), -1) if form == "half" else ang.repeat_interleave(2, -1)
        cos, sin = ang.cos().to(k.dtype), ang.sin().to(k.dtype)
        k = rotary.undo(k, cos, sin, form)
        extra += [cos, sin]
    return k @ uk.transpose(-1, -2)[None], v @ uv.transpose(-1, -2)[None], extra


def cascade(*, rank: object = None, causal: bool = False, form: str = "online", schedule: str = "fused",
            tile_q: object = 64, tile_k: object = 64, rope: object = None) -> ir.Cascade:
    """Low-rank K/V: K = CK·UK, V = CV·UV with rank R; UK is absorbed into q, UV applied to the output.

    With ``rope`` the rotation sits between CK·UK and the scores, so UK cannot be absorbed into q: K = CK·UK is
    rebuilt (a rank-R contraction per key element), rotated with the model's cos and sin (the quarter turn of
    each pair, then K·cos + rotate(K)·sin: three element ops per key element, cos and sin read from memory),
    and the scores run at head dim E; values stay rank R with UV applied to the output. That path runs as
    library calls (the Triton kernel does not take the rotation), so it is priced in the eager schedule on
    every target: the rebuilt, rotated K is written and read back once.
    """
    rr = size(rank) if rank is not None else sym("R")
    q = Access("Q", ("b", "g", "r", "p", "e"))
    ql = Access("QL", ("b", "g", "r", "p", "l"))
    ck, cv = Access("CK", ("b", "g", "m", "l")), Access("CV", ("b", "g", "m", "l"))
    pred = Predicate("causal", causal=True, tile_q=size(tile_q), tile_k=size(tile_k)) if causal else None
    inputs: tuple[str, ...] = ("Q", "CK", "CV", "UK", "UV")
    if rope:
        if rope not in rotary.FORMS:
            raise ValueError(f"latent: rope must be one of {rotary.FORMS}, not {rope!r}")
        schedule = "eager"
        ku, kr = Access("KU", ("b", "g", "m", "e")), Access("KR", ("b", "g", "m", "e"))
        kfull = Access("K", ("b", "g", "m", "e"))
        cos, sin = Access("COS", ("b", "m", "e")), Access("SIN", ("b", "m", "e"))
        pre = [Einsum(ku, (ck, Access("UK", ("g", "l", "e"))), ("mul",), ("l",), "sum"),
               Einsum(kr, (ku,), ("neg",)),  # rotate(K): the pairs swapped, one sign flipped
               Einsum(kfull, (ku, cos, kr, sin), ("mul", "mul", "add"))]
        core_ops, splits, it, groups = core(q, kfull, cv, key="m", qranks=("b", "g", "r", "p"), form=form,
                                            out="OL", predicate=pred, fdim="l")
        first_groups = [["KU"], ["KR", "K"]]  # a matmul, then the rotation's element-wise calls
        inputs += ("COS", "SIN")
    else:
        pre = [Einsum(ql, (q, Access("UK", ("g", "l", "e"))), ("mul",), ("e",), "sum")]
        core_ops, splits, it, groups = core(ql, ck, cv, key="m", qranks=("b", "g", "r", "p"), form=form,
                                            out="OL", predicate=pred, fdim="l")
        first_groups = [["QL"]]
    ops = (pre + core_ops +
           [Einsum(Access("AV", ("b", "g", "r", "p", "f")), (Access("OL", ("b", "g", "r", "p", "l")),
                                                             Access("UV", ("g", "l", "f"))), ("mul",), ("l",), "sum")])
    sizes = base_sizes() + [("l", rr)]
    if form == "online":
        kernel_groups = first_groups + [[e.name for e in core_ops], ["AV"]]
        fused = {len(first_groups)}
    else:
        kernel_groups = first_groups + groups + [["AV"]]
        fused = set()
    return finish(VARIANT, ops, sizes, inputs, splits, it, kernel_groups, schedule,
                  fused_groups=fused, tile_q=tile_q, tile_k=tile_k, params={"rank": rr},
                  notes="low-rank K/V, " + ("K rebuilt and rotated" if rope else "up-projections absorbed")
                  + (", causal" if causal else ""))


PROBE = "latent_probe"


def _probe(q, k, v, mask, scale, causal, *, extra=(), softcap=0.0, fill=None, probe: str = "", rank: int = 0,
           rope: Optional[str] = None):
    """Planning only: full K/V projected inside the op by the candidate bases looked up by ``probe`` (with
    ``rope``: the op's extra are the model's [cos, sin], and K is un-rotated before it is projected)."""
    from codegen.lowrank import PROBES

    uk, uv = PROBES[probe]
    if rope:
        if len(extra) != 2:
            raise ValueError("latent probe with rope: the op must carry the model's [cos, sin] as extra")
        cos, sin = extra
        k = rotary.undo(k, cos, sin, rope)
        ck = torch.einsum("bgmd,grd->bgmr", k, uk.to(k.dtype))
        cv = torch.einsum("bgmd,grd->bgmr", v, uv.to(v.dtype))
        return kernel(q, ck, cv, mask, scale, causal, extra=[uk.to(q.dtype), uv.to(q.dtype), cos, sin],
                      softcap=softcap, fill=fill, rank=rank, rope=rope)
    ck = torch.einsum("bgmd,grd->bgmr", k, uk.to(k.dtype))
    cv = torch.einsum("bgmd,grd->bgmr", v, uv.to(v.dtype))
    return kernel(q, ck, cv, mask, scale, causal, extra=[uk.to(q.dtype), uv.to(q.dtype)], softcap=softcap,
                  fill=fill, rank=rank)


KERNEL = register(KernelVariant(
    name=VARIANT, kernel=kernel, reference=reference, spans=lambda **_: [EVERY_KEY],
    supports=frozenset({"softcap", "fill", "mask", "gqa"}), top_left=True,
    # rotary keys run in torch: the Triton kernel absorbs UK into q, which the rotation forbids
    triton=TritonKernel("ranges", ("rank",), low_rank=True, available=lambda p: not p.get("rope")),
    output_dim=_output_dim,
    timed_as=_dense.KERNEL.name, cascade=cascade, cascade_params={"rank": int, "rope": str},
    examples=lambda n: [{"rank": 3}, {"rank": 5}, {"rank": 3, "rope": "half"}],
    degenerate=lambda n, e: {"rank": e}, operands=_operands,
    probes={PROBE: _probe}))
