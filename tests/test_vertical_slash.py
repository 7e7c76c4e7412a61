"""vertical_slash: the estimate picks the columns and diagonals a plain loop picks, and the kernel attends to them.

The registry's conformance test already runs the kernel against its reference on awkward sizes, GQA,
decode steps and soft-capping; here the estimate and the kept set are pinned against hand-written loops,
and a forced choice that cannot run at a site is a clear error.
"""
from __future__ import annotations

import math

import pytest
import torch

import codegen  # noqa: F401  (registers the op and the kernels)
import rewriter
from codegen.naive import naive_attention
from codegen.variants.vertical_slash import estimate, kept


def _loop_estimate(q, k, scale, causal, vertical, slash, last_q, block, sinks, window):
    """The estimate by loops over heads, queries and keys, in float64."""
    b, h, p, _ = q.shape
    g, m = k.shape[1], k.shape[2]
    cols, diags = [], []
    for bi in range(b):
        crow, drow = [], []
        for hi in range(h):
            col = [0.0] * m
            diag: dict[int, float] = {}
            for li in range(p - min(last_q, p), p):
                pos = m - p + li
                s = [float(q[bi, hi, li].double() @ k[bi, hi // (h // g), j].double()) * scale for j in range(m)]
                seen = [j for j in range(m) if not causal or j <= pos]
                top = max(s[j] for j in seen)
                z = sum(math.exp(s[j] - top) for j in seen)
                for j in seen:
                    w = math.exp(s[j] - top) / z
                    col[j] += w
                    diag[pos - j] = diag.get(pos - j, 0.0) + w
            forced_cols = set(range(min(sinks, m)))
            rest = sorted((j for j in range(m) if j not in forced_cols), key=lambda j: -col[j])
            n_rest = max(0, min(m, vertical + len(forced_cols)) - len(forced_cols))
            crow.append(sorted(forced_cols | set(rest[:n_rest])))
            offsets = range(0 if causal else -(m - 1), m)
            forced_d = {d for d in range(0, window, block) if d < m}
            rest_d = sorted((d for d in offsets if d not in forced_d), key=lambda d: -diag.get(d, 0.0))
            drow.append(sorted(forced_d | set(rest_d[:slash])))
        cols.append(crow)
        diags.append(drow)
    return cols, diags


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 4, 2, 23, 23, 8), (2, 2, 1, 6, 19, 4)])
def test_estimate_matches_a_loop(shape, causal):
    b, h, g, p, m, e = shape
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(b, h, p, e, generator=gen), torch.randn(b, g, m, e, generator=gen)
    args = dict(vertical=4, slash=3, last_q=5, block=4, sinks=1, window=8)
    cols, diags = estimate(q, k, 0.4, causal, **args)
    want_cols, want_diags = _loop_estimate(q, k, 0.4, causal, **args)
    assert cols.tolist() == want_cols
    assert diags.tolist() == want_diags


def test_kept_set_is_the_columns_and_each_blocks_bands():
    p = m = 20
    cols = torch.tensor([[[0, 9]]])
    diags = torch.tensor([[[0, 6]]])
    vis = kept(p, m, cols, diags, block=4, causal=True)[0, 0]
    for i in range(p):
        t0 = (i // 4) * 4
        want = {0, 9} | {j for d in (0, 6) for j in range(t0 - d, t0 - d + 4)}
        want = {j for j in want if 0 <= j <= i}
        assert set(torch.nonzero(vis[i]).flatten().tolist()) == want, i


def test_a_planted_pattern_is_found_and_kept():
    """Keys that every query attends to (a column) and a fixed lag (a slash) are what the estimate keeps."""
    torch.manual_seed(0)
    b, h, n, e = 1, 2, 256, 16
    q = torch.randn(b, h, n, e) * 0.1
    k = torch.randn(b, h, n, e) * 0.1
    direction = torch.randn(e)
    q += direction * 2
    k[:, :, 37] += direction * 3  # a vertical line at key 37
    lag = 50
    for i in range(lag, n):  # a slash at offset 50: query i likes key i - 50
        u = torch.randn(e)
        q[:, :, i] += u * 3
        k[:, :, i - lag] += u * 3
    cols, diags = estimate(q, k, e ** -0.5, True, vertical=4, slash=2, last_q=32, block=16, sinks=1, window=16)
    assert (cols == 37).any(-1).all()
    assert (diags == lag).any(-1).all()
    out = codegen.run("vertical_slash", q, k, k, None, e ** -0.5, True, vertical=4, slash=2, last_q=32, block=16,
                      window=16)
    dense = naive_attention(q, k, k, None, e ** -0.5, visible=torch.ones(n, n, dtype=torch.bool).tril())
    assert (out - dense).norm() / dense.norm() < (dense * 0 + k.mean(2, keepdim=True) - dense).norm() / dense.norm()


class _Causal(torch.nn.Module):
    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        self.h, self.qkv = heads, torch.nn.Linear(d, 3 * d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(b, n, d)


def test_forced_last_q_beyond_the_queries_is_a_clear_error():
    x = torch.randn(1, 4100, 32)
    with pytest.raises(ValueError, match="last_q=5000 is larger than the site's 4100 queries"):
        rewriter.optimize(_Causal().eval(), x, budget=None,
                          variants={"vertical_slash": {"vertical": 8, "slash": 2, "last_q": 5000}})
    with pytest.raises(ValueError, match="vertical_slash: slash must be >= 0"):
        rewriter.optimize(_Causal().eval(), x, budget=None, variants={"vertical_slash": {"slash": -1}})


def test_forced_with_every_column_is_exact_end_to_end():
    torch.manual_seed(2)
    model, x = _Causal().eval(), torch.randn(1, 4100, 32)
    opt = rewriter.optimize(model, x, budget=None, dynamic=False,
                            variants={"vertical_slash": {"vertical": 4100, "slash": 1, "block": 64}})
    (d,) = opt.plan.decisions
    assert d.variant == "vertical_slash"
    fresh = torch.randn(1, 4100, 32)
    with torch.no_grad():
        assert rewriter.relative_l2(model(fresh), opt(fresh)) < 1e-5


def test_short_sites_are_refused_with_the_reason():
    from passes.variants.vertical_slash import MIN_KEYS

    opt = rewriter.optimize(_Causal().eval(), torch.randn(1, 300, 32), budget=None, dynamic=False,
                            variants={"vertical_slash": {"vertical": 8, "slash": 1}})
    (d,) = opt.plan.decisions
    assert d.variant != "vertical_slash" and f"below {MIN_KEYS}" in d.reason, d


def test_a_padding_mask_is_refused_with_its_reason():
    from passes.planner import site_candidates
    from passes.pricing import profile
    from passes.site import AttentionSite

    site = AttentionSite(name="a", index=0, causal=False, mask_kind="padding", is_cross=False, num_heads=4,
                         num_kv_heads=4, head_dim=16, q_len=4096, kv_len=4096, spelling="matmul", v_head_dim=16,
                         batch=1, scale=0.25)
    sp = site_candidates(site, {"vertical_slash": None}, profile("cpu"), forced=False)
    assert any(r.startswith("vertical_slash: ") and "padding" in r for r in sp.refusals), sp.refusals
