"""block_sparse with the op's mask taking part in the selection (padded batches).

A key block the mask hides wholly from a query block is never chosen, so on a padded batch the
kept blocks go to real keys; the CPU kernels must still equal the naive reference, and the
selection is rebuilt here by hand (independently of ``codegen.variants.block_sparse``).
"""
from __future__ import annotations

import math

import pytest
import torch

import codegen
from codegen.naive import naive_attention
from codegen.variants import block_sparse
from tests import builders

# b, h, g, p, m, e, f: lengths not multiples of the block, GQA and MQA, Nq != Nkv
SHAPES = [
    (3, 4, 2, 100, 100, 8, 12),
    (2, 2, 1, 77, 77, 16, 16),
    (2, 3, 3, 5, 131, 16, 8),
]


_inputs = builders.qkv


def _valid_keys(b: int, m: int, left: bool) -> torch.Tensor:
    """[B, M] bool: batch row i keeps a different number of keys, several whole blocks hidden."""
    lens = [max(1, m - (m * (i + 1)) // (b + 1)) for i in range(b)]
    lens[-1] = m if b > 2 else lens[-1]  # one unpadded row when there are three or more
    keep = torch.zeros(b, m, dtype=torch.bool)
    for i, n in enumerate(lens):
        if left:
            keep[i, m - n:] = True
        else:
            keep[i, :n] = True
    return keep


def _mask(kind: str, keep: torch.Tensor, h: int, p: int) -> torch.Tensor:
    b, m = keep.shape
    if kind == "bool":
        return keep[:, None, None, :]
    if kind == "bool_rows":  # a padding mask materialised over the query rows, as exported BERTs pass it
        return keep[:, None, None, :].expand(b, 1, p, m).clone()
    if kind == "finfo_min":
        return torch.zeros(b, 1, 1, m).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    if kind == "per_head_additive":  # a soft bias on top of the padding, different per head
        gen = torch.Generator().manual_seed(7)
        bias = 0.5 * torch.randn(b, h, 1, m, generator=gen)
        return bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    raise ValueError(kind)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _expected_chosen(q, k, keep_keys, causal, keep, block):
    """The selection written out per (batch, head, query block) with plain loops."""
    b, h, p, e = q.shape
    g, m = k.shape[1], k.shape[2]
    nq, nk = math.ceil(p / block), math.ceil(m / block)
    nsel = min(nk, max(1, math.ceil(keep * nk)))
    out = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            kk = k[bi, hi // (h // g)]
            for qb in range(nq):
                rows = range(qb * block, min(p, qb * block + block))
                qpool = q[bi, hi, list(rows)].mean(0)
                first, last = m - p + rows[0], m - p + rows[-1]
                cands = []
                for kb in range(nk):
                    keys = [j for j in range(kb * block, min(m, kb * block + block)) if keep_keys[bi, j]]
                    if causal and kb * block > last:
                        continue  # wholly in the future
                    if not keys:
                        continue  # wholly hidden by the mask: never chosen
                    must = kb == 0 or max(first, 0) // block <= kb <= last // block
                    score = float(qpool @ kk[keys].mean(0))
                    cands.append((not must, -score, kb))
                for _, _, kb in sorted(cands)[:nsel]:
                    out[bi, hi, qb, kb] = True
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool", "bool_rows", "finfo_min", "per_head_additive"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_kernel_equals_reference_on_padded_batches(shape, causal, kind, left):
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape)
    keep_keys = _valid_keys(b, m, left)
    mask = _mask(kind, keep_keys, h, p)
    for keep, block in ((0.3, 16), (0.5, 8), (0.35, 32), (0.4, 64)):
        out = codegen.run("block_sparse", q, k, v, mask, 0.3, causal, keep=keep, block=block)
        ref = block_sparse.reference(q, k, v, mask, 0.3, causal, keep=keep, block=block)
        assert _rel(out, ref) < 1e-5, (keep, block)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_kernel_takes_every_block_width(block, causal):
    """The C++ kernel itself (not the gathered fallback) runs 16-, 32- and 64-key blocks, ragged F included."""
    from codegen import cpu_kernel
    from codegen.cpu_blocked import blocked_attention
    from codegen.pattern import dense_blocks, from_dense_blocks, intervals

    if cpu_kernel.load() is None:
        pytest.skip("the C++ kernel cannot be built here")
    b, h, g, p, m, e, f = 2, 4, 2, 150, 150, 16, 20
    q, k, v = _inputs(b, h, g, p, m, e, f, seed=6)
    mask = _mask("finfo_min", _valid_keys(b, m, left=False), h, p)
    chosen = block_sparse.select_blocks(q, k, causal, 0.5, block, mask)
    lo, hi = intervals("block_sparse", (), p, m, causal)
    anyb, fullb = dense_blocks(lo, hi, m, block, block)
    bm = from_dense_blocks(chosen & anyb, chosen & fullb, block, block)
    out = cpu_kernel.try_run(q, k, v, mask, 0.3, 0.0, bm, lo, hi)
    assert out is not None
    assert _rel(out, blocked_attention(q, k, v, mask, 0.3, 0.0, bm, lo, hi)) < 1e-5
    assert _rel(out, block_sparse.reference(q, k, v, mask, 0.3, causal, keep=0.5, block=block)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_selection_skips_hidden_blocks(causal, left):
    b, h, g, p, m, e, f = 3, 4, 2, 90, 90, 8, 8
    q, k, v = _inputs(b, h, g, p, m, e, f, seed=3)
    keep_keys = _valid_keys(b, m, left)
    for kind in ("bool", "finfo_min"):
        mask = _mask(kind, keep_keys, h, p)
        for keep, block in ((0.4, 16), (0.25, 8)):
            got = block_sparse.select_blocks(q, k, causal, keep, block, mask)
            want = _expected_chosen(q, k, keep_keys, causal, keep, block)
            assert torch.equal(got, want), (kind, keep, block)
            hidden = ~torch.nn.functional.pad(keep_keys, (0, -m % block)).view(b, -1, block).any(-1)
            assert not (got & hidden[:, None, None, :]).any()


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_when_the_real_keys_fit_the_kept_blocks(shape, causal):
    """Rows whose real keys span no more blocks than are kept get exact masked attention."""
    b, h, g, p, m, e, f = shape
    q, k, v = _inputs(*shape, seed=4)
    block = 16
    nk = math.ceil(m / block)
    keep_keys = torch.zeros(b, m, dtype=torch.bool)
    keep_keys[:, : 2 * block - 3] = True  # two live key blocks per row (the second partly padded)
    mask = keep_keys[:, None, None, :]
    exact = naive_attention(q, k, v, mask, 0.3, visible=(torch.ones(p, m, dtype=torch.bool).tril(m - p)
                                                         if causal else None))
    out = codegen.run("block_sparse", q, k, v, mask, 0.3, causal, keep=2 / nk, block=block)
    assert _rel(out, exact) < 1e-5
    # without the mask in the selection, the same budget would drop real keys for some query blocks
    blind = block_sparse.select_blocks(q, k, causal, 2 / nk, block)
    assert (blind[..., 2:].any(-1)).any()


def test_fully_hidden_rows_give_zero():
    """A batch row whose keys are all hidden visits no block; its output is 0, as in the reference."""
    b, h, g, p, m, e, f = 2, 2, 1, 40, 40, 8, 8
    q, k, v = _inputs(b, h, g, p, m, e, f)
    keep_keys = torch.ones(b, m, dtype=torch.bool)
    keep_keys[1] = False
    mask = keep_keys[:, None, None, :]
    out = codegen.run("block_sparse", q, k, v, mask, 0.3, False, keep=0.5, block=16)
    assert block_sparse.select_blocks(q, k, False, 0.5, 16, mask)[1].sum() == 0
    assert out[1].abs().max() == 0
    ref = block_sparse.reference(q, k, v, mask, 0.3, False, keep=0.5, block=16)
    assert _rel(out, ref) < 1e-5
