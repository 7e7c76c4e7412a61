"""Each variant's float64 reference against an independent statement of its semantics (a hand-built mask)."""
from __future__ import annotations

import math

import pytest
import torch

from codegen.registry import kernel_variants


def _ref(name: str):
    return kernel_variants()[name].reference


def _naive(q, k, v, visible, scale):
    """Dense masked softmax attention; visible [P, M] bool (or [B,H,P,M])."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    return s.softmax(-1) @ v


def _positions(p, m):
    qpos = torch.arange(m - p, m)[:, None]
    kpos = torch.arange(m)[None, :]
    return qpos, kpos


def _inputs(b, h, g, p, m, e, f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, p, e, generator=gen, dtype=torch.float64),
            torch.randn(b, g, m, e, generator=gen, dtype=torch.float64),
            torch.randn(b, g, m, f, generator=gen, dtype=torch.float64))


SHAPES = [  # b, h, g, p, m, e, f -- lengths not multiples of the blocks
    (1, 2, 2, 77, 77, 16, 16),
    (2, 4, 2, 100, 100, 8, 12),
    (1, 2, 1, 5, 131, 16, 8),
    (1, 3, 3, 1, 50, 8, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,block", [(7, 16), (20, 8), (1, 5)])
def test_sliding_window(shape, causal, window, block):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    qpos, kpos = _positions(p, m)
    vis = (qpos - kpos).abs() < window
    if causal:
        vis &= kpos <= qpos
    out = _ref("sliding_window")(q, k, v, None, 0.3, causal, window=window, block=block)
    torch.testing.assert_close(out, _naive(q, k, v, vis, 0.3))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,sinks,block", [(9, 4, 16), (3, 1, 7), (30, 3, 8)])
def test_sinks_window(shape, causal, window, sinks, block):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    qpos, kpos = _positions(p, m)
    vis = ((qpos - kpos).abs() < window) | (kpos < sinks)
    if causal:
        vis &= kpos <= qpos
    out = _ref("sinks_window")(q, k, v, None, 0.3, causal, window=window, sinks=sinks, block=block)
    torch.testing.assert_close(out, _naive(q, k, v, vis, 0.3))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_keep_all_is_dense(shape, causal):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    qpos, kpos = _positions(p, m)
    vis = kpos <= qpos if causal else torch.ones(p, m, dtype=torch.bool)
    out = _ref("block_sparse")(q, k, v, None, 0.3, causal, block=16, keep=1.0)
    torch.testing.assert_close(out, _naive(q, k, v, vis, 0.3))


@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_selects_blocks(causal):
    """With keep < 1 the output equals dense attention restricted to the selected key blocks."""
    b, h, g, p, m, e, f = 1, 2, 1, 90, 90, 8, 8
    block, keep = 16, 0.4
    q, k, v = _inputs(b, h, g, p, m, e, f, seed=3)
    out = _ref("block_sparse")(q, k, v, None, 0.5, causal, block=block, keep=keep)
    # rebuild the selection independently from pooled scores: the first block and the diagonal are forced
    nq = nk = -(-m // block)
    nsel = min(nk, max(1, math.ceil(keep * nk)))
    qpad = torch.nn.functional.pad(q * 0.5, (0, 0, 0, nq * block - p)).view(b, h, nq, block, e).mean(-2)
    kpad = torch.nn.functional.pad(k, (0, 0, 0, nk * block - m)).view(b, g, nk, block, e).sum(-2)
    counts = torch.clamp(m - torch.arange(nk) * block, max=block)
    kpool = kpad / counts[:, None]
    sc = qpad @ kpool.repeat_interleave(h // g, 1).transpose(-1, -2)
    qb = torch.arange(nq)
    must = (torch.arange(nk)[None, :] == qb[:, None]) | (torch.arange(nk)[None, :] == (
        torch.clamp(qb * block + block - 1, max=m - 1) // block)[:, None]) | (torch.arange(nk)[None, :] == 0)
    sc = sc.masked_fill(must, float("inf"))
    if causal:
        sc = sc.masked_fill(torch.arange(nk)[None, :] * block > torch.clamp(qb * block + block - 1, max=m - 1)[:, None],
                            float("-inf"))
    chosen = torch.zeros(b, h, nq, nk, dtype=torch.bool).scatter_(-1, sc.topk(nsel, -1).indices, True)
    qpos, kpos = _positions(p, m)
    vis = chosen[:, :, qpos[:, 0] // block][..., kpos[0] // block]
    if causal:
        vis = vis & (kpos <= qpos)
    torch.testing.assert_close(out, _naive(q, k, v, vis, 0.5))
    assert not torch.allclose(out, _naive(q, k, v, (kpos <= qpos) if causal else torch.ones(p, m, dtype=torch.bool),
                                          0.5))


def _naive_linear(q, k, v, causal):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    qf, kf = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    w = qf @ kf.transpose(-1, -2)
    if causal:
        qpos, kpos = _positions(q.shape[2], k.shape[2])
        w = w * (kpos <= qpos)
    return (w @ v) / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [16, 7])
def test_linear(shape, causal, chunk):
    q, k, v = _inputs(*shape)
    out = _ref("linear")(q, k, v, None, 0.3, causal, chunk=chunk)
    torch.testing.assert_close(out, _naive_linear(q, k, v, causal))


def test_latent_low_rank_matches_projected_kv():
    """The SVD factors the planner fits, through latent's reference: attention over the projected K/V."""
    from passes.variants.latent import factors

    b, h, g, p, m, e, f = 1, 4, 2, 33, 47, 16, 16
    q, k, v = _inputs(b, h, g, p, m, e, f, seed=5)
    ck, uk, cv, uv = factors(k, v, 5)
    out = _ref("latent")(q, ck, cv, None, 0.3, True, extra=[uk, uv])
    top_left = torch.ones(p, m, dtype=torch.bool).tril()  # the op's causal alignment
    want = _naive(q, ck @ uk[None], cv @ uv[None], top_left, 0.3)
    torch.testing.assert_close(out, want)
    assert (out - _naive(q, k, v, top_left, 0.3)).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(kernel_variants()))
def test_every_variant_has_a_cascade(name):
    from cost_model.cascades import build
    assert build(name).name == name
