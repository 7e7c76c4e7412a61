"""``latent`` on keys that pass through rotary embeddings (Palu style): K is factored before the rotation and
the op rebuilds K = rope(CK·UK) with the model's own cos and sin."""
from __future__ import annotations

import re

import pytest
import torch

import rewriter
from codegen import rotary
from codegen.ops import recording
from codegen.variants import latent as latent_kernel
from passes import metrics
from passes.surgery import factors

VARIANT = latent_kernel.VARIANT


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _angles(m: int, e: int, form: str, dtype=torch.float32, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(0, e, 2, dtype=torch.float64) / e))
    ang = (torch.arange(m, dtype=torch.float64) + offset)[:, None] * inv[None]
    ang = torch.cat((ang, ang), -1) if form == "half" else ang.repeat_interleave(2, -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("form", rotary.FORMS)
def test_undo_inverts_apply_even_for_scaled_cos_sin(form):
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    cos, sin = _angles(7, 10, form, torch.float64)
    for scale in (1.0, 1.3):  # YaRN-style attention scaling multiplies cos and sin
        y = rotary.apply(x, cos * scale, sin * scale, form)
        assert torch.allclose(rotary.undo(y, cos * scale, sin * scale, form), x, atol=1e-12)


# b, h, g, p, m, e, f, r: odd lengths, GQA, fewer queries than keys (top-left causal), one query
SHAPES = [(2, 6, 2, 13, 13, 16, 12, 5), (1, 4, 4, 5, 11, 8, 8, 3), (2, 3, 1, 1, 9, 12, 10, 7)]


@pytest.mark.parametrize("form", rotary.FORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True)])
def test_kernel_matches_reference(form, shape, causal, masked):
    b, h, g, p, m, e, f, r = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, h, p, e, generator=gen)
    ck, cv = torch.randn(b, g, m, r, generator=gen), torch.randn(b, g, m, r, generator=gen)
    uk, uv = torch.randn(g, r, e, generator=gen) / r ** 0.5, torch.randn(g, r, f, generator=gen) / r ** 0.5
    cos, sin = _angles(m, e, form)
    cos, sin = (cos[None, None].expand(b, 1, m, e), sin[None, None].expand(b, 1, m, e)) if b > 1 else (cos, sin)
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
        mask[-1, ..., m - 3:] = False
    extra = [uk, uv, cos, sin]
    got = rewriter.run_kernel(VARIANT, q, ck, cv, mask, e ** -0.5, causal, extra=extra, rank=r, rope=form) \
        if hasattr(rewriter, "run_kernel") else latent_kernel.kernel(q, ck, cv, mask, e ** -0.5, causal, extra=extra,
                                                                     rank=r, rope=form)
    ref = latent_kernel.reference(q, ck, cv, mask, e ** -0.5, causal, extra=extra, rope=form)
    assert got.shape == (b, h, p, f)
    assert (got - ref).abs().max() < 1e-5, (got - ref).abs().max()
    # the planning probe (rotated K in, un-rotated and projected inside the op) is the same math
    from codegen import lowrank
    lowrank.PROBES["test-rotary"] = (torch.linalg.qr(uk.transpose(-1, -2)).Q.transpose(-1, -2), uv)
    try:
        ub = lowrank.PROBES["test-rotary"][0]
        k_plain = torch.randn(b, g, m, e, generator=gen)
        k_rot = rotary.apply(k_plain, cos, sin, form)
        v = torch.randn(b, g, m, f, generator=gen)
        probe = latent_kernel._probe(q, k_rot, v, mask, e ** -0.5, causal, extra=[cos, sin], probe="test-rotary",
                                     rank=r, rope=form)
        want = latent_kernel.reference(q, k_plain @ ub.transpose(-1, -2)[None], v @ uv.transpose(-1, -2)[None], mask,
                                       e ** -0.5, causal, extra=[ub, uv, cos, sin], rope=form)
        assert (probe - want).abs().max() < 1e-5
    finally:
        lowrank.PROBES.pop("test-rotary")


def test_full_rank_is_exact_attention_over_the_rotated_keys():
    b, h, g, m, e = 2, 4, 2, 9, 8
    q, k, v = torch.randn(b, h, m, e), torch.randn(b, g, m, e), torch.randn(b, g, m, e)
    cos, sin = _angles(m, e, "half")
    eye = torch.eye(e).expand(g, e, e)
    got = latent_kernel.kernel(q, k, v, None, e ** -0.5, True, extra=[eye, eye, cos, sin], rope="half")
    krot = rotary.apply(k, cos, sin, "half")
    want = torch.nn.functional.scaled_dot_product_attention(q, krot.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    assert (got - want).abs().max() < 1e-5


def test_basis_is_completed_when_fewer_rows_than_rank():
    from passes.calibrate import SiteRecord

    k = torch.randn(1, 2, 3, 8)  # 3 rows per head, rank 6
    rec = SiteRecord(k, k, k, None, k, 1.0, False, 0.0, None, None)
    up = factors([rec], "k", 6)
    assert up.shape == (2, 6, 8)
    assert torch.allclose(up @ up.transpose(-1, -2), torch.eye(6).expand(2, 6, 6), atol=1e-5)
    # the recorded rows are reproduced exactly by the basis
    assert torch.allclose(k @ up.transpose(-1, -2)[None] @ up[None], k, atol=1e-5)


def _kv_reported(plan) -> tuple[int, int]:
    (note,) = [n for n in plan.notes if " K/V per token" in n]
    a, b = re.search(r"([\d,]+) -> ([\d,]+) bytes", note).groups()
    return int(a.replace(",", "")), int(b.replace(",", ""))


def _param_reported(plan) -> int:
    (note,) = [n for n in plan.notes if n.startswith(f"{VARIANT} weight surgery")]
    n = int(re.search(r"\(([\d,]+) (fewer|more)\)", note).group(1).replace(",", ""))
    return n if "fewer" in note else -n


def _check_surgery(model, inputs, opt, sites: int, rank: int, heads: int, head_dim: int):
    assert [d.variant for d in opt.plan.decisions] == [VARIANT] * sites, str(opt.plan)
    assert all(d.params.get("rope") == "half" for d in opt.plan.decisions)
    before, after = _params(model), sum(t.numel() for t in opt.program.state_dict.values())
    assert before - after == _param_reported(opt.plan)
    with torch.no_grad(), recording() as calls:
        out = opt(**inputs)
    lat = [c for c in calls if c["variant"] == VARIANT]
    assert len(lat) == sites and all(c["k"].shape[-1] == rank and len(c["extra"]) == 4 for c in lat)
    for c in lat:  # the kernel against its float64 reference on what the model really passed
        ref = latent_kernel.reference(c["q"], c["k"], c["v"], c["mask"], c["scale"], c["causal"], extra=c["extra"],
                                      **c["params"])
        assert rewriter.relative_l2(ref, c["out"]) < 1e-5
    # K/V bytes per token: what the op reads per key, against the original G·(E+F) elements per site
    kv_after = sum((c["k"].shape[1] * c["k"].shape[-1] + c["v"].shape[1] * c["v"].shape[-1]) * 4 for c in lat)
    assert _kv_reported(opt.plan) == (sites * heads * 2 * head_dim * 4, kv_after)
    return out


def test_hf_llama_latent_at_full_rank_is_exact():
    from hf_fixtures import build_llama

    model, inputs = build_llama("sdpa", mask="padded")
    with torch.no_grad():
        ref = model(**inputs).logits
    opt = rewriter.optimize(model, inputs, variants={VARIANT: {"rank": 16}}, budget=None)
    out = _check_surgery(model, inputs, opt, sites=2, rank=16, heads=2, head_dim=16)
    pad = inputs["attention_mask"].bool()
    assert metrics.error(ref, out.logits, "l2", pad) < 1e-4


def test_hf_llama_latent_at_half_rank_saves_what_the_plan_says():
    from hf_fixtures import build_llama

    model, inputs = build_llama("sdpa", mask="padded")
    with torch.no_grad():
        ref = model(**inputs).logits
    opt8 = rewriter.optimize(model, inputs, variants={VARIANT: {"rank": 8}}, budget=None)
    out8 = _check_surgery(model, inputs, opt8, sites=2, rank=8, heads=2, head_dim=16)
    # 2 layers, K and V in each: a 64 -> 2x16 Linear becomes 64 -> 2x8 down plus 2 heads' 8 -> 16 up
    assert _param_reported(opt8.plan) == 2 * 2 * (64 * 32 - (64 * 16 + 2 * 8 * 16))
    pad = inputs["attention_mask"].bool()
    kl = metrics.error(ref, out8.logits, "kl", pad)
    assert kl < 0.05, kl
    assert abs(kl - opt8.plan.error) < 0.5 * opt8.plan.error + 1e-4 or opt8.plan.holdout_error is not None


def test_hf_llama_planner_chooses_among_ranks_with_calibration():
    from hf_fixtures import build_llama

    model, inputs = build_llama("eager", mask="padded")
    opt = rewriter.optimize(model, inputs, variants=[VARIANT], budget=None)
    assert all(d.variant == VARIANT and d.params["rope"] == "half" for d in opt.plan.decisions), str(opt.plan)
    assert all(d.error is not None for d in opt.plan.decisions)


def test_rope_lm_latent_at_its_four_sites():
    from rewriter.rope_lm import RopeLM

    torch.manual_seed(0)
    model = RopeLM().eval()
    inputs = {"input_ids": torch.randint(0, 256, (2, 9))}
    opt = rewriter.optimize(model, inputs, variants={VARIANT: {"rank": 32}}, budget=None)
    _check_surgery(model, inputs, opt, sites=4, rank=32, heads=2, head_dim=64)


class _ComplexRope(torch.nn.Module):
    """Rotary in complex-number form (as Meta's original Llama writes it): not supported."""

    def __init__(self, dim: int = 32, heads: int = 2, complex_form: bool = True):
        super().__init__()
        self.h, self.d, self.complex_form = heads, dim // heads, complex_form
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.h, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        cos, sin = _angles(n, self.d, "interleaved")
        if self.complex_form:
            freqs = torch.polar(torch.ones(n, self.d // 2), torch.atan2(sin[:, ::2], cos[:, ::2]))
            k = torch.view_as_real(torch.view_as_complex(k.reshape(b, self.h, n, -1, 2)) * freqs).flatten(-2)
        else:  # not a rotation: the halves are flipped, not turned
            k = k * cos + k.flip(-1) * sin
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("complex_form,why", [(True, "complex-number form"), (False, "not a recognised rotary")])
def test_unsupported_rotary_is_refused_with_a_reason(complex_form, why):
    torch.manual_seed(0)
    model = _ComplexRope(complex_form=complex_form).eval()
    x = torch.randn(2, 7, 32)
    opt = rewriter.optimize(model, x, variants={VARIANT: {"rank": 8}}, budget=None)
    (d,) = opt.plan.decisions
    assert d.variant != VARIANT and why in d.reason, str(opt.plan)
    with torch.no_grad():
        assert rewriter.relative_l2(opt(x), model(x)) < 1e-5


def test_cascade_prices_the_rebuild_and_the_rotation():
    """With rotary keys UK cannot be absorbed into q: the cascade rebuilds K (R multiply-adds per key element),
    rotates it (a quarter turn, then two multiplies and an add per element, cos and sin read), and runs as
    library calls on every target (the Triton kernel does not take the rotation)."""
    import sympy

    from cost_model import analysis, hardware
    from cost_model.ir import B, E, G, M
    from cost_model.predict import predict

    plain, rope = latent_kernel.cascade(rank=8, causal=True), latent_kernel.cascade(rank=8, causal=True, rope="half")
    assert {"COS", "SIN"} <= set(rope.inputs) and not {"COS", "SIN"} & set(plain.inputs)
    rebuild, turn = analysis.op_counts(rope, ("KU",)), analysis.op_counts(rope, ("KR", "K"))
    assert sympy.simplify(rebuild.macs - 8 * B * G * M * E) == 0
    assert turn.macs == 0 and sympy.simplify(turn.others - 4 * B * G * M * E) == 0
    assert rope.kernels is not None and [k.name for k in rope.kernels][:2] == ["k0:KU", "k1:KR"]
    shape = dict(B=2, H=8, G=2, P=4096, M=4096, E=64, F=64)
    hw = hardware.get("cpu")  # library calls both ways here, so the two are priced alike but for the rotary part
    a = predict(VARIANT, shape, hw, causal=True, rank=32)
    b = predict(VARIANT, shape, hw, causal=True, rank=32, rope="half")
    assert b.others - a.others >= 4 * 2 * 2 * 4096 * 64
    assert b.bytes - a.bytes >= 2 * 2 * 4096 * 64 * hw.dtype_bytes  # cos and sin at least
    assert b.seconds > a.seconds
    gpu = predict(VARIANT, shape, hardware.get("h100"), causal=True, rank=32, rope="half")
    assert [k for k, _ in gpu.kernels] == [k for k, _ in b.kernels]  # not one fused Triton kernel on a GPU either
    with pytest.raises(ValueError, match="rope"):
        latent_kernel.cascade(rank=8, rope="complex")
