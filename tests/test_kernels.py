"""Every registered CPU kernel against naive math on awkward shapes, masks, GQA and ragged lengths.

The element masks here are written out by hand (independently of ``codegen.pattern``), so a
wrong interval in a spec fails these tests rather than being shared by kernel and reference.
"""
from __future__ import annotations

import json

import pytest
import torch

import codegen
from codegen.naive import naive_attention
from codegen.pattern import cached_block_map
from codegen.variants import block_sparse, latent, linear
from tests import builders

SHAPES = [  # b, h, g, p, m, e, f: lengths not multiples of any block; GQA, MQA, Nq != Nkv, decode
    (1, 2, 2, 77, 77, 16, 16),
    (2, 4, 2, 100, 100, 8, 12),
    (1, 2, 1, 5, 131, 16, 8),
    (1, 3, 3, 1, 50, 8, 8),
]


_inputs, _masks = builders.qkv, builders.masks


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _grid_visible(p, m, causal, window=None, sinks=0):
    i = torch.arange(m - p, m)[:, None]
    j = torch.arange(m)[None, :]
    vis = (i - j).abs() < window
    if sinks:
        vis |= j < sinks
    if causal:
        vis &= j <= i
    return vis


def _neigh_visible(p, m, rows, cols, kh, kw, prefix, causal):
    vis = torch.zeros(p, m, dtype=torch.bool)
    end = prefix + rows * cols
    for qi in range(p):
        i = m - p + qi
        if not prefix <= i < end:
            vis[qi] = True
        else:
            r, c = divmod(i - prefix, cols)
            r0 = min(max(r - kh // 2, 0), max(rows - kh, 0))
            c0 = min(max(c - kw // 2, 0), max(cols - kw, 0))
            for rr in range(r0, min(r0 + kh, rows)):
                for cc in range(c0, min(c0 + kw, cols)):
                    vis[qi, prefix + rr * cols + cc] = True
            vis[qi, :prefix] = True
            vis[qi, end:] = True
        if causal:
            vis[qi, i + 1:] = False
    return vis


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_name", ["none", "padding", "additive_padding", "bool", "additive"])
def test_window_variants(shape, causal, mask_name):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    mask = _masks(b, h, p, m)[mask_name]
    for block in (16, 64):
        for window in (1, 7, 300):
            out = codegen.run("sliding_window", q, k, v, mask, 0.3, causal, window=window, block=block)
            ref = naive_attention(q, k, v, mask, 0.3, visible=_grid_visible(p, m, causal, window))
            assert _rel(out, ref) < 1e-5, (block, window)
        out = codegen.run("sinks_window", q, k, v, mask, 0.3, causal, window=9, sinks=3, block=block,
                          softcap=4.0)
        ref = naive_attention(q, k, v, mask, 0.3, visible=_grid_visible(p, m, causal, 9, 3), softcap=4.0)
        assert _rel(out, ref) < 1e-5, block


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_name", ["none", "padding", "bool"])
def test_neighborhood_2d(shape, causal, mask_name):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    mask = _masks(b, h, p, m)[mask_name]
    rows, cols = 4, 7
    for kernel, prefix in (([3, 5], 2), ([1, 3], 0), ([9, 9], 1)):
        vis = _neigh_visible(p, m, rows, cols, *kernel, prefix, causal)
        ref = naive_attention(q, k, v, mask, 0.3, visible=vis)
        for block in (16, 64):  # 64 runs the compiled kernel where it builds, 16 the gathered path
            out = codegen.run("neighborhood_2d", q, k, v, mask, 0.3, causal, grid=[rows, cols], kernel=kernel,
                              prefix=prefix, block=block)
            assert _rel(out, ref) < 1e-5, (kernel, prefix, block)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_name", ["none", "padding", "additive"])
def test_block_sparse(shape, causal, mask_name):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    mask = _masks(b, h, p, m)[mask_name]
    for keep, block in ((0.3, 16), (0.5, 8), (0.4, 64)):
        out = codegen.run("block_sparse", q, k, v, mask, 0.3, causal, keep=keep, block=block)
        ref = block_sparse.reference(q, k, v, mask, 0.3, causal, keep=keep, block=block)
        assert _rel(out, ref) < 1e-5
    # the selection keeps the required blocks and the requested count
    chosen = block_sparse.select_blocks(q, k, causal, 0.3, 16)
    assert chosen[..., 0].all()


def test_degenerate_parameters_are_exact():
    shape = (2, 4, 2, 70, 70, 16, 16)
    q, k, v = _inputs(*shape)
    for causal in (True, False):
        exact = naive_attention(q, k, v, None, 0.25, visible=_grid_visible(70, 70, causal, 10 ** 6))
        runs = {
            "sliding_window": dict(window=70),
            "sinks_window": dict(window=70, sinks=4),
            "block_sparse": dict(keep=1.0, block=16),
            "neighborhood_2d": dict(grid=[7, 10], kernel=[7, 11], prefix=0),
        }
        for name, params in runs.items():
            assert _rel(codegen.run(name, q, k, v, None, 0.25, causal, **params), exact) < 1e-5, name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map", linear.FEATURE_MAPS)
def test_linear(shape, causal, feature_map):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    q, k = q * 0.5, k * 0.5
    gen = torch.Generator().manual_seed(3)
    extra = [torch.randn(h, e, 6, generator=gen), torch.randn(h, 6, generator=gen),
             torch.randn(g, e, 6, generator=gen), torch.randn(g, 6, generator=gen)] \
        if feature_map == "hedgehog" else []
    masks = _masks(b, h, p, m)
    for mask in (None, masks["padding"], masks["additive_padding"]):
        for window, chunk in ((0, 16), (0, 5), (6, 16)):
            out = codegen.run("linear", q, k, v, mask, 0.3, causal, extra=extra, feature_map=feature_map,
                              chunk=chunk, window=window)
            ref = linear.reference(q, k, v, mask, 0.3, causal, extra=extra, feature_map=feature_map,
                                   window=window)
            assert _rel(out, ref) < 1e-5, (window, chunk)


@pytest.mark.parametrize("causal", [True, False])
def test_linear_in_many_query_segments(monkeypatch, causal):
    """Long inputs run in cache-sized query segments with the state carried between them: same result."""
    monkeypatch.setattr(linear, "_BUDGET_BYTES", 1)  # every segment is one chunk
    b, h, g, p, m, e, f = 2, 4, 2, 45, 53, 8, 5
    q, k, v = _inputs(b, h, g, p, m, e, f)
    mask = _masks(b, h, p, m)["padding"]
    for fm in ("elu1", "taylor"):
        out = codegen.run("linear", q * 0.5, k * 0.5, v, mask, 0.3, causal, feature_map=fm, chunk=8)
        ref = linear.reference(q * 0.5, k * 0.5, v, mask, 0.3, causal, feature_map=fm)
        assert _rel(out, ref) < 1e-5, fm


def test_linear_reference_is_the_quadratic_form():
    q, k, v = _inputs(1, 1, 1, 6, 6, 4, 3)
    s = 0.5 * q[0, 0].double() @ k[0, 0].double().T
    a = (1 + s + s * s / 2).tril()
    want = (a @ v[0, 0].double()) / a.sum(-1, keepdim=True)
    got = linear.reference(q, k, v, None, 0.5, True, feature_map="taylor")
    assert torch.allclose(got[0, 0].double(), want, atol=1e-6)


def test_linear_refuses_query_dependent_masks():
    q, k, v = _inputs(1, 2, 2, 10, 10, 8, 8)
    with pytest.raises(ValueError, match="key-padding"):
        codegen.run("linear", q, k, v, torch.rand(10, 10) > 0.5, 0.3, False, feature_map="elu1")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_latent_and_gqa_merge(shape, causal):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    gen = torch.Generator().manual_seed(4)
    for mask_name in ("none", "padding", "additive"):
        mask = _masks(b, h, p, m)[mask_name]
        r = 5
        uk, uv = torch.randn(g, r, e, generator=gen), torch.randn(g, r, f, generator=gen)
        ck, cv = torch.randn(b, g, m, r, generator=gen), torch.randn(b, g, m, r, generator=gen)
        out = codegen.run("latent", q, ck, cv, mask, 0.3, causal, extra=[uk, uv], rank=r)
        kk, vv = ck @ uk[None], cv @ uv[None]
        vis = torch.ones(p, m, dtype=torch.bool).tril() if causal else None
        assert _rel(out, naive_attention(q, kk, vv, mask, 0.3, visible=vis)) < 1e-5
        assert _rel(out, latent.reference(q, ck, cv, mask, 0.3, causal, extra=[uk, uv])) < 1e-5
        out = codegen.run("gqa_merge", q, k, v, mask, 0.3, causal)
        assert _rel(out, naive_attention(q, k, v, mask, 0.3, visible=vis)) < 1e-5


def test_latent_full_rank_is_exact():
    q, k, v = _inputs(1, 4, 2, 33, 33, 8, 8)
    uk = torch.linalg.qr(torch.randn(2, 8, 8))[0].transpose(-1, -2)  # orthonormal rows [G,R,E]
    uv = torch.linalg.qr(torch.randn(2, 8, 8))[0].transpose(-1, -2)
    ck, cv = k @ uk.transpose(-1, -2)[None], v @ uv.transpose(-1, -2)[None]
    out = codegen.run("latent", q, ck, cv, None, 0.3, True, extra=[uk, uv], rank=8)
    assert _rel(out, codegen.run("dense", q, k, v, None, 0.3, True)) < 1e-5


def test_op_runs_every_variant_half_precision():
    q, k, v = (t.half() for t in _inputs(1, 4, 2, 40, 40, 16, 16))
    params = {
        "sliding_window": {"window": 8}, "sinks_window": {"window": 8, "sinks": 2},
        "block_sparse": {"keep": 0.5, "block": 16}, "neighborhood_2d": {"grid": [5, 8], "kernel": [3, 3]},
        "linear": {"feature_map": "elu1", "chunk": 16},
    }
    for name, prm in params.items():
        out = torch.ops.rewriter.attention(q, k, v, None, 0.25, True, name, json.dumps(prm), [])
        assert out.dtype == torch.float16 and out.shape == (1, 4, 40, 16) and torch.isfinite(out).all(), name


def test_block_map_skips_blocks_outside_the_window():
    bm, lo, hi = cached_block_map("sliding_window", (("window", 100),), 1000, 1000, True, 64, 64)
    assert int(bm.num.max()) <= 3  # (64 + 99) keys span at most 3 blocks of 64
    for qb in range(bm.num.shape[0]):
        for s in range(int(bm.num[qb])):
            kb = int(bm.idx[qb, s])
            assert kb <= qb and kb * 64 + 63 > qb * 64 - 100
    # full blocks are exactly those where every query of the block sees every key of the block
    qb = 10
    for s in range(int(bm.num[qb])):
        kb = int(bm.idx[qb, s])
        i = torch.arange(qb * 64, qb * 64 + 64)[:, None]
        j = torch.arange(kb * 64, kb * 64 + 64)[None, :]
        assert bool(bm.full[qb, s]) == bool(((j <= i) & (i - j < 100)).all())


def test_kernel_sources_round_trip():
    from codegen.sources import kernel_sources, verify_sources
    src = kernel_sources("sliding_window", {"window": 64})
    (name, (text, digest)), = [(n, t) for n, t in src.items() if "_cpu_" in n]
    assert name.startswith("sliding_window_cpu_") and '"window": 64' in text
    assert verify_sources("sliding_window", {"window": 64}, src) == []
    assert verify_sources("sliding_window", {"window": 65}, src) != []
    assert kernel_sources("sliding_window", {"window": 64}) == src  # deterministic
