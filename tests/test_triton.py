"""Generated Triton kernels under TRITON_INTERPRET=1 against each variant's naive reference.

Tiny shapes on purpose (the interpreter runs one program at a time in numpy): lengths that are
not multiples of the 16-wide tiles, GQA/MQA, Nq != Nkv both ways, head dims that are not powers
of two, every mask kind, causal and not, float32 and float16 (never bfloat16: the interpreter
gets it silently wrong).  Each output buffer starts as NaN and must be fully overwritten.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first generated kernel's import
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import codegen  # noqa: E402
from codegen import triton as ct  # noqa: E402
from codegen.naive import causal_top_left, naive_attention  # noqa: E402
from codegen.sparse import reference_pattern  # noqa: E402
from codegen.variants import block_sparse, latent, linear  # noqa: E402
from tests import builders  # noqa: E402

pytestmark = pytest.mark.skipif(not ct.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")

# b, h, g, p, m, e, f
SHAPES = {
    "ragged": (1, 2, 2, 40, 40, 16, 16),
    "gqa_e24": (1, 4, 2, 37, 37, 24, 24),
    "mqa_short_q": (2, 2, 1, 21, 45, 16, 24),
    "long_q": (1, 2, 2, 45, 21, 24, 16),
    "decode": (1, 2, 1, 1, 33, 16, 16),
}
TOL = {torch.float32: 1e-4, torch.float16: 5e-4}  # fp16 output alone rounds at 2^-11 (measured 2.8e-4 rms)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REWRITER_TRITON_CACHE", str(tmp_path_factory.getbasetemp() / "triton-cache"))


def _inputs(shape, dtype, seed=0):
    return tuple(x.to(dtype) for x in builders.qkv(*shape, seed=seed))


def _mask(kind, shape, seed=1):
    b, h, g, p, m, e, f = shape
    return builders.masks(b, h, p, m, seed)[kind]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _reference(variant, q, k, v, mask, scale, causal, softcap=0.0, fill=None, **params):
    """float64 naive math of the variant on the very same (possibly rounded) inputs."""
    qd, kd, vd = q.double(), k.double(), v.double()
    if variant == "dense":
        vis = causal_top_left(q.shape[2], k.shape[2]) if causal else None
        return naive_attention(qd, kd, vd, mask, scale, visible=vis, softcap=softcap, fill=fill)
    if variant == "block_sparse":
        return block_sparse.reference(qd, kd, vd, mask, scale, causal, softcap=softcap, **params)
    if variant == "linear":
        return linear.reference(qd, kd, vd, mask, scale, causal, **params)
    return reference_pattern(variant, params, qd, kd, vd, mask, scale, causal, softcap)


def _check(variant, shape, mask_kind, causal, dtype, softcap=0.0, fill=None, **params):
    q, k, v = _inputs(shape, dtype)
    mask = _mask(mask_kind, shape)
    scale = 0.7 / q.shape[-1] ** 0.5
    out = torch.full((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), float("nan"), dtype=dtype)
    got = ct.run(variant, q, k, v, mask, scale, causal, softcap=softcap, fill=fill, out=out, **params)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "output not fully overwritten (or NaN produced)"
    ref = _reference(variant, q, k, v, mask, scale, causal, softcap, fill, **params)
    err = _rel(out, ref)
    assert err < TOL[dtype], f"{variant} {shape} {mask_kind} causal={causal} {dtype}: rel L2 {err:.2e}"
    return err


CASES = [("ragged", "none"), ("gqa_e24", "bool"), ("mqa_short_q", "additive"),
         ("long_q", "padding"), ("decode", "additive_padding"), ("ragged", "additive")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,mask_kind", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_dense(shape, mask_kind, causal, dtype):
    _check("dense", SHAPES[shape], mask_kind, causal, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("window", [5, 33])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,mask_kind", CASES[:4], ids=[f"{s}-{m}" for s, m in CASES[:4]])
def test_sliding_window(shape, mask_kind, causal, window, dtype):
    _check("sliding_window", SHAPES[shape], mask_kind, causal, dtype, window=window)


@pytest.mark.parametrize("sinks,window", [(3, 5), (20, 4), (17, 33)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,mask_kind", CASES[:4], ids=[f"{s}-{m}" for s, m in CASES[:4]])
def test_sinks_window(shape, mask_kind, causal, sinks, window):
    _check("sinks_window", SHAPES[shape], mask_kind, causal, torch.float32, window=window, sinks=sinks)


@pytest.mark.parametrize("keep,dtype", [(0.3, torch.float32), (0.3, torch.float16), (1.0, torch.float32)],
                         ids=["keep0.3-fp32", "keep0.3-fp16", "keep1-fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,mask_kind", CASES[:4], ids=[f"{s}-{m}" for s, m in CASES[:4]])
def test_block_sparse(shape, mask_kind, causal, keep, dtype):
    _check("block_sparse", SHAPES[shape], mask_kind, causal, dtype, keep=keep, block=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pad", ["right_bool", "left_finfo_min"])
def test_block_sparse_skips_blocks_the_mask_hides(pad, causal, dtype):
    """Padded batch rows with whole hidden key blocks: the selection never spends a slot on them."""
    b, h, g, p, m, e, f = shape = (2, 4, 2, 45, 45, 16, 16)
    q, k, v = _inputs(shape, dtype)
    keep = torch.zeros(b, m, dtype=torch.bool)
    lens = (13, 35)  # row 0: two whole hidden blocks of 16; row 1: a partly hidden third block
    for i, n in enumerate(lens):
        if pad.startswith("left"):
            keep[i, m - n:] = True
        else:
            keep[i, :n] = True
    mask = (keep[:, None, None, :] if pad == "right_bool" else
            torch.zeros(b, 1, 1, m, dtype=dtype).masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min))
    scale = 0.7 / e ** 0.5
    out = torch.full((b, h, p, f), float("nan"), dtype=dtype)
    ct.run("block_sparse", q, k, v, mask, scale, causal, out=out, keep=0.4, block=16)
    ref = block_sparse.reference(q.double(), k.double(), v.double(), mask, scale, causal, keep=0.4, block=16)
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < TOL[dtype]
    chosen = block_sparse.select_blocks(q, k, causal, 0.4, 16, mask)
    assert not chosen[0, ..., 1:].any() if pad == "right_bool" else not chosen[0, ..., :2].any()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_neighborhood_2d(mask_kind, causal):
    # 2 global tokens, a 5x7 grid, 3 trailing global tokens: 40 tokens
    shape = (1, 4, 2, 40, 40, 24, 16)
    _check("neighborhood_2d", shape, mask_kind, causal, torch.float32, grid=[5, 7], kernel=[3, 5], prefix=2,
           block=16)
    if mask_kind == "none":
        _check("neighborhood_2d", shape, mask_kind, causal, torch.float16, grid=[5, 7], kernel=[3, 5], prefix=2,
               block=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,mask_kind", [("ragged", "none"), ("gqa_e24", "padding"),
                                             ("mqa_short_q", "additive_padding"), ("long_q", "none"),
                                             ("decode", "padding")])
def test_linear(shape, mask_kind, causal, dtype):
    _check("linear", SHAPES[shape], mask_kind, causal, dtype, feature_map="elu1", chunk=16)


def test_linear_refuses_what_it_does_not_fuse():
    q, k, v = _inputs(SHAPES["ragged"], torch.float32)
    with pytest.raises(ValueError, match="key-padding"):
        ct.run("linear", q, k, v, _mask("bool", SHAPES["ragged"]), 0.3, True)
    with pytest.raises(ValueError, match="elu1"):
        ct.run("linear", q, k, v, None, 0.3, True, feature_map="taylor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind,fill", [("none", None), ("bool", -50.0), ("additive", None)])
def test_latent_fused_up_projections(mask_kind, fill, causal, dtype):
    # q [.., E=24] projected to rank 12 by uk, output up-projected to F=20 by uv, both inside the kernel
    b, h, g, p, m, e, r, f = 1, 4, 2, 37, 41, 24, 12, 20
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, h, p, e, generator=gen).to(dtype)
    ck, cv = (torch.randn(b, g, m, r, generator=gen).to(dtype) for _ in range(2))
    uk, uv = (torch.randn(g, r, e, generator=gen) / 3).to(dtype), torch.randn(g, r, f, generator=gen).to(dtype)
    mask = _mask(mask_kind, (b, h, g, p, m, e, f))
    out = torch.full((b, h, p, f), float("nan"), dtype=dtype)
    ct.run("latent", q, ck, cv, mask, 0.3, causal, extra=[uk, uv], softcap=2.0, fill=fill, out=out)
    ref = latent.reference(q.double(), ck.double(), cv.double(), mask, 0.3, causal,
                           extra=[uk.double(), uv.double()], softcap=2.0, fill=fill)
    # fp16: q.uk and the rank-R output round to fp16 between the fused steps, as the PyTorch path does
    tol = 1e-4 if dtype == torch.float32 else 1e-3
    assert not torch.isnan(out).any() and _rel(out, ref) < tol


@pytest.mark.parametrize("variant,params", [("dense", {}), ("sliding_window", {"window": 9}),
                                            ("sinks_window", {"window": 9, "sinks": 2})])
def test_softcap(variant, params):
    _check(variant, SHAPES["gqa_e24"], "additive", True, torch.float32, softcap=1.5, **params)


def test_dense_finite_fill():
    # a bool mask with a finite fill: a row hiding every key averages its values, as masked_fill did
    shape = SHAPES["ragged"]
    q, k, v = _inputs(shape, torch.float32)
    mask = _mask("bool", shape)
    mask[..., 3, :] = False
    out = ct.run("dense", q, k, v, mask, 0.3, False, fill=-1e4)
    ref = _reference("dense", q, k, v, mask, 0.3, False, fill=-1e4)
    assert _rel(out, ref) < 1e-4
    assert _rel(out[..., 3, :], v.mean(2)) < 1e-4


def test_rows_without_keys_are_zero():
    # bottom-right causal window with P > M: the first P - M queries see no key at all
    shape = SHAPES["long_q"]
    q, k, v = _inputs(shape, torch.float32)
    out = torch.full((1, 2, 45, 16), float("nan"))
    ct.run("sliding_window", q, k, v, None, 0.3, True, window=4, out=out)
    assert bool((out[:, :, :24] == 0).all()) and not torch.isnan(out).any()


def test_dispatch_through_registered_kernels(monkeypatch):
    """codegen.run reaches the generated kernel (forced on CPU under the interpreter) and agrees."""
    monkeypatch.setenv("REWRITER_TRITON", "force")
    calls = []
    real = ct.run

    def spy(variant, *a, **kw):
        calls.append(variant)
        return real(variant, *a, **kw)

    monkeypatch.setattr("codegen.triton.run", spy)
    shape = SHAPES["gqa_e24"]
    q, k, v = _inputs(shape, torch.float32)
    for variant, params in [("dense", {}), ("sliding_window", {"window": 6, "block": 16}),
                            ("block_sparse", {"keep": 0.5, "block": 16}), ("linear", {"chunk": 16}),
                            ("linear", {"feature_map": "taylor"})]:  # taylor stays on the PyTorch path
        got = codegen.run(variant, q, k, v, None, 0.25, True, **params)
        monkeypatch.setenv("REWRITER_TRITON", "0")
        cpu = codegen.run(variant, q, k, v, None, 0.25, True, **params)
        monkeypatch.setenv("REWRITER_TRITON", "force")
        assert _rel(got, cpu) < 1e-5
    assert calls == ["dense", "sliding_window", "block_sparse", "linear"]
    uk, uv = torch.randn(2, 8, 24) / 3, torch.randn(2, 8, 24)
    ck, cv = k[..., :8].contiguous(), v[..., :8].contiguous()
    got = codegen.run("latent", q, ck, cv, None, 0.25, False, extra=[uk, uv], rank=8)
    monkeypatch.setenv("REWRITER_TRITON", "0")
    assert _rel(got, codegen.run("latent", q, ck, cv, None, 0.25, False, extra=[uk, uv], rank=8)) < 1e-5
    assert calls[-1] == "latent"


def test_failure_falls_back_and_warns_once(monkeypatch):
    monkeypatch.setenv("REWRITER_TRITON", "force")
    monkeypatch.setattr(ct, "_WARNED", set())
    monkeypatch.setattr(ct, "_FAILED", set())

    def broken(*a, **kw):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr("codegen.triton.run", broken)
    shape = SHAPES["ragged"]
    q, k, v = _inputs(shape, torch.float32)
    ref = _reference("sliding_window", q, k, v, None, 0.25, True, window=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = codegen.run("sliding_window", q, k, v, None, 0.25, True, window=7)
            assert _rel(out, ref) < 1e-5
    assert len([w for w in caught if "simulated compile failure" in str(w.message)]) == 1


def test_generated_source_is_readable_and_keyed_by_spec():
    spec_a = ct.call_spec("sinks_window", *_inputs(SHAPES["gqa_e24"], torch.float16), None, True, 0.0,
                          {"window": 8, "sinks": 4})
    spec_b = ct.call_spec("sinks_window", *_inputs(SHAPES["gqa_e24"], torch.float16), None, True, 0.0,
                          {"window": 9, "sinks": 4})
    src = ct.generate(spec_a)
    assert spec_a.hash != spec_b.hash and src != ct.generate(spec_b)
    assert f"# spec hash: {spec_a.hash}" in src and '"window": 8' in src and "def attention_kernel" in src
    assert "vis = (kpos <= 3) | ((kpos >= qpos - 7) & (kpos <= qpos + 7))  # sinks, window" in src
    assert ct.generate(spec_a) == src  # deterministic
    mod = ct.load(spec_a)
    assert mod.SPEC_HASH == spec_a.hash and mod.__file__.endswith(f"sinks_window_{spec_a.hash}.py")


@pytest.mark.parametrize("variant,params", [
    ("dense", {}), ("gqa_merge", {}), ("sliding_window", {"window": 64}), ("sinks_window", {"window": 64, "sinks": 4}),
    ("block_sparse", {"keep": 0.25, "block": 64}), ("neighborhood_2d", {"grid": [8, 8], "kernel": [3, 3]}),
    ("linear", {"feature_map": "elu1", "chunk": 64}), ("latent", {"rank": 32})])
def test_kernel_sources_carry_triton(variant, params):
    from codegen.sources import kernel_sources, verify_sources
    fields = {"dtype": "float16", "head_dim": 80, "value_dim": 80, "gqa": 4, "causal": True}
    src = kernel_sources(variant, params, **fields)
    (name, (text, digest)), = [(n, t) for n, t in src.items() if "_triton_" in n]
    spec_hash = name.rsplit("_", 1)[1].removesuffix(".py")
    assert f"# spec hash: {spec_hash}" in text and "tl.arange(0, 128)" in text  # 80 padded
    assert verify_sources(variant, params, src, **fields) == []
    assert verify_sources(variant, params, src, **{**fields, "head_dim": 96}) != []
    tampered = {**src, name: (text + "#", "0" * 64)}
    assert verify_sources(variant, params, tampered, **fields) == [name]
    compile(text, name, "exec")  # valid Python


def test_triton_op_eager():
    from codegen.triton import library
    if library.OP is None:
        pytest.skip("torch.library.triton_op unavailable")
    shape = SHAPES["gqa_e24"]
    q, k, v = _inputs(shape, torch.float32)
    mask = _mask("additive", shape)
    got = torch.ops.rewriter_triton.attention(q, k, v, mask, 0.3, True, "sliding_window", '{"window": 6}')
    assert _rel(got, _reference("sliding_window", q, k, v, mask, 0.3, True, window=6)) < 1e-4
    with pytest.raises(ValueError, match="not traceable"):
        torch.ops.rewriter_triton.attention(q, k, v, None, 0.3, True, "block_sparse", '{"keep": 0.5}')

