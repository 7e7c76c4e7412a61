"""Generated Triton kernels on CUDA against SDPA, compiled FlexAttention and the naive math.

Marked ``gpu``: skipped without CUDA (and run with ``pytest -m gpu``).  Lengths are ragged
(not multiples of any tile), head dims include a non-power of two, and fp16/bf16 are both
checked (the interpreter cannot check bf16).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu]
# skip before importing Triton: imported without TRITON_INTERPRET, its standard library cannot
# run under the interpreter that tests/test_triton.py switches on in CPU-only sessions
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("CUDA tests run compiled kernels, not the interpreter", allow_module_level=True)
pytest.importorskip("triton")

import codegen  # noqa: E402
from codegen import triton as ct  # noqa: E402
from codegen.naive import naive_attention  # noqa: E402
from codegen.sparse import reference_pattern  # noqa: E402
from codegen.variants import block_sparse  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}
DTYPES = [torch.float16, torch.bfloat16]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _qkv(b, h, g, p, m, e, f, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    return mk(b, h, p, e), mk(b, g, m, e), mk(b, g, m, f)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 8, 1000, 1000, 64, 64), (1, 8, 2, 777, 777, 128, 128),
                                   (1, 4, 1, 333, 333, 80, 80)], ids=["mha", "gqa", "mqa_d80"])
def test_dense_vs_sdpa(shape, causal, dtype):
    q, k, v = _qkv(*shape, dtype)
    out = torch.full((shape[0], shape[1], shape[3], shape[6]), float("nan"), device="cuda", dtype=dtype)
    ct.run("dense", q, k, v, None, None, causal, out=out)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=shape[1] != shape[2])
    assert not torch.isnan(out).any() and _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "padding"])
def test_dense_masks_fp32_exact(mask_kind):
    # float32 runs its dots in IEEE precision (no tf32): 1e-4 against float64 math
    b, h, g, p, m, e, f = 2, 4, 2, 201, 333, 72, 40
    q, k, v = _qkv(b, h, g, p, m, e, f, torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(3)
    mask = {"bool": torch.rand(b, 1, p, m, generator=gen, device="cuda") > 0.3,
            "additive": torch.randn(b, h, p, m, generator=gen, device="cuda"),
            "padding": torch.arange(m, device="cuda")[None, None, None, :] < torch.tensor([m, m - 50],
                device="cuda")[:, None, None, None],
            }[mask_kind]
    got = ct.run("dense", q, k, v, mask, 0.1, False, softcap=3.0)
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.1, softcap=3.0)
    assert _rel(got.cpu(), ref) < 1e-4


def _flex(q, k, v, mask_mod, n):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    bm = create_block_mask(mask_mod, None, None, n, n, device="cuda")
    return torch.compile(flex_attention)(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant,params", [("sliding_window", {"window": 100}),
                                            ("sinks_window", {"window": 100, "sinks": 4}),
                                            ("neighborhood_2d", {"grid": [30, 33], "kernel": [7, 9], "prefix": 1})])
def test_sparse_vs_flex(variant, params, dtype):
    n = 991
    q, k, v = _qkv(1, 8, 2, n, n, 64, 64, dtype)
    if variant == "sliding_window":
        w = params["window"]
        mm = lambda b, h, i, j: (j <= i) & (i - j < w)  # noqa: E731
    elif variant == "sinks_window":
        w, s = params["window"], params["sinks"]
        mm = lambda b, h, i, j: (j <= i) & ((i - j < w) | (j < s))  # noqa: E731
    else:
        from codegen.pattern import intervals, visible
        from codegen.sparse import freeze_params
        lo, hi = intervals(variant, freeze_params(params), n, n, True)
        vis = visible(lo, hi, n).cuda()
        mm = lambda b, h, i, j: vis[i, j]  # noqa: E731
    got = ct.run(variant, q, k, v, None, None, True, **params)
    ref = _flex(q, k, v, mm, n)
    assert _rel(got, ref) < TOL[dtype]


@pytest.mark.parametrize("variant,params", [("sliding_window", {"window": 37}),
                                            ("sinks_window", {"window": 37, "sinks": 70}),
                                            ("block_sparse", {"keep": 0.3, "block": 64}),
                                            ("neighborhood_2d", {"grid": [20, 20], "kernel": [5, 5], "prefix": 3})])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_vs_naive_nq_ne_nkv(variant, params, causal):
    q, k, v = _qkv(2, 4, 2, 300, 403, 48, 48, torch.float16)
    mask = torch.randn(2, 1, 300, 403, device="cuda", dtype=torch.float16)
    got = ct.run(variant, q, k, v, mask, 0.15, causal, **params).cpu()
    qd, kd, vd, md = q.cpu().double(), k.cpu().double(), v.cpu().double(), mask.cpu()
    if variant == "block_sparse":
        ref = block_sparse.reference(qd, kd, vd, md, 0.15, causal, **params)
    else:
        ref = reference_pattern(variant, params, qd, kd, vd, md, 0.15, causal)
    assert _rel(got, ref) < TOL[torch.float16]


def test_registered_kernels_use_triton_on_cuda(monkeypatch):
    calls = []
    real = ct.run
    monkeypatch.setattr("codegen.triton.run",
                        lambda variant, *a, **kw: calls.append(variant) or real(variant, *a, **kw))
    q, k, v = _qkv(1, 4, 2, 257, 257, 64, 64, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would fail the test
        for variant, params in [("dense", {}), ("sliding_window", {"window": 64}),
                                ("sinks_window", {"window": 64, "sinks": 4}), ("block_sparse", {"keep": 0.5})]:
            codegen.run(variant, q, k, v, None, None, True, **params)
    assert calls == ["dense", "sliding_window", "sinks_window", "block_sparse"]


def test_triton_op_compile():
    from codegen.triton import library
    if library.OP is None:
        pytest.skip("torch.library.triton_op unavailable")
    q, k, v = _qkv(1, 4, 2, 300, 300, 64, 64, torch.float16)

    def fn(q, k, v):
        o = torch.ops.rewriter_triton.attention(q * 1.5, k, v, None, 0.125, True, "sliding_window", '{"window": 50}')
        return o.float().relu()

    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    assert _rel(compiled, eager) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_vs_naive(causal, dtype):
    from codegen.variants import linear
    q, k, v = _qkv(2, 4, 2, 700, 1000, 64, 48, dtype)
    pad = torch.ones(2, 1, 1, 1000, dtype=torch.bool, device="cuda")
    pad[1, ..., -77:] = False
    got = ct.run("linear", q, k, v, pad, 0.125, causal, feature_map="elu1", chunk=64).cpu()
    ref = linear.reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), pad.cpu(), 0.125, causal)
    assert _rel(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_latent_vs_naive(causal, dtype):
    from codegen.variants import latent
    b, h, g, p, m, e, r, f = 2, 8, 2, 333, 517, 128, 48, 96
    gen = torch.Generator(device="cuda").manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(dtype)  # noqa: E731
    q, ck, cv, uk, uv = mk(b, h, p, e), mk(b, g, m, r), mk(b, g, m, r), mk(g, r, e) / 8, mk(g, r, f)
    got = ct.run("latent", q, ck, cv, None, e ** -0.5, causal, extra=[uk, uv]).cpu()
    ref = latent.reference(*(x.cpu().double() for x in (q, ck, cv)), None, e ** -0.5, causal,
                           extra=[uk.cpu().double(), uv.cpu().double()])
    assert _rel(got, ref) < 2 * TOL[dtype]  # two extra roundings between the fused steps
