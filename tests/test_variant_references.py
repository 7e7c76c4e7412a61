"""Each variant's reference math against a naive dense computation with the same mask."""
from __future__ import annotations

import importlib

import pytest
import torch


def _mod(name: str):
    return importlib.import_module(f"passes.variants.{name}")


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
    out = _mod("sliding_window").reference(q, k, v, scale=0.3, causal=causal, window=window, block=block)
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
    out = _mod("sinks_window").reference(q, k, v, scale=0.3, causal=causal, window=window, sinks=sinks,
                                         block=block)
    torch.testing.assert_close(out, _naive(q, k, v, vis, 0.3))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_keep_all_is_dense(shape, causal):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    qpos, kpos = _positions(p, m)
    vis = kpos <= qpos if causal else torch.ones(p, m, dtype=torch.bool)
    out = _mod("block_sparse").reference(q, k, v, scale=0.3, causal=causal, block=16, keep=1.0)
    torch.testing.assert_close(out, _naive(q, k, v, vis, 0.3))


@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_selects_blocks(causal):
    """With keep < 1 the output equals dense attention restricted to the selected key blocks."""
    b, h, g, p, m, e, f = 1, 2, 1, 90, 90, 8, 8
    block, keep = 16, 0.4
    q, k, v = _inputs(b, h, g, p, m, e, f, seed=3)
    bs = _mod("block_sparse")
    out = bs.reference(q, k, v, scale=0.5, causal=causal, block=block, keep=keep)
    # rebuild the selection independently from pooled scores
    nq = nk = -(-m // block)
    nsel = min(nk, max(1, -(-int(keep * nk * 1000) // 1000)))
    import math
    nsel = min(nk, max(1, math.ceil(keep * nk)))
    qpad = torch.nn.functional.pad(q * 0.5, (0, 0, 0, nq * block - p)).view(b, h, nq, block, e).mean(-2)
    kpad = torch.nn.functional.pad(k, (0, 0, 0, nk * block - m)).view(b, g, nk, block, e).sum(-2)
    counts = torch.clamp(m - torch.arange(nk) * block, max=block)
    kpool = kpad / counts[:, None]
    sc = qpad @ kpool.repeat_interleave(h // g, 1).transpose(-1, -2)
    qb = torch.arange(nq)
    must = (torch.arange(nk)[None, :] == qb[:, None]) | (torch.arange(nk)[None, :] == (
        torch.clamp(qb * block + block - 1, max=m - 1) // block)[:, None])
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
    assert not torch.allclose(out, _naive(q, k, v, (kpos <= qpos) if causal else torch.ones(p, m, dtype=torch.bool), 0.5))


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
    out = _mod("linear").reference(q, k, v, scale=0.3, causal=causal, chunk=chunk)
    torch.testing.assert_close(out, _naive_linear(q, k, v, causal))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_latent_full_rank_is_exact(shape, causal):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    qpos, kpos = _positions(p, m)
    vis = kpos <= qpos if causal else torch.ones(p, m, dtype=torch.bool)
    out = _mod("latent").reference(q, k, v, scale=0.3, causal=causal, rank=max(e, f))
    torch.testing.assert_close(out, _naive(q, k, v, vis, 0.3))


def test_latent_low_rank_matches_projected_kv():
    b, h, g, p, m, e, f = 1, 4, 2, 33, 47, 16, 16
    q, k, v = _inputs(b, h, g, p, m, e, f, seed=5)
    lat = _mod("latent")
    ck, uk, cv, uv = lat.factors(k, v, 5)
    out = lat.reference(q, k, v, scale=0.3, causal=True, rank=5)
    qpos, kpos = _positions(p, m)
    want = _naive(q, ck @ uk[None], cv @ uv[None], kpos <= qpos, 0.3)
    torch.testing.assert_close(out, want)
    assert (out - _naive(q, k, v, kpos <= qpos, 0.3)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sliding_window", "sinks_window", "block_sparse", "linear", "latent"])
def test_cascade_names_exist(name):
    from cost_model.cascades import CASCADES
    assert _mod(name).CASCADE in CASCADES
