"""The planner: candidates priced and scored on calibration records, chosen inside the budget; bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import rewriter
from passes.planner import available


class LocalAttention(nn.Module):
    """Self-attention whose scores carry a distance penalty, so far keys barely matter (a window fits)."""

    def __init__(self, dim: int = 64, heads: int = 4, n: int = 300, slope: float = 0.6):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        pos = torch.arange(n)
        self.register_buffer("distance", -slope * (pos[:, None] - pos[None, :]).abs().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + self.distance[:n, :n]
        y = torch.softmax(s, dim=-1) @ v
        return x + self.out(y.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        k, v = self.kv(memory).chunk(2, dim=-1)
        y = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(k), split(v))
        return y.transpose(1, 2).reshape(b, n, d)


class RowPaddedAttention(nn.Module):
    """A key-padding mask materialised over the query rows ([B, 1, N, N]), as exported BERTs pass theirs."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        m = attention_mask[:, None, None, :].bool().expand(b, 1, n, n)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return y.transpose(1, 2).reshape(b, n, d)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_local_model_gets_a_cheaper_variant_within_budget():
    model = LocalAttention().eval()
    x = torch.randn(4, 300, 64)
    opt = rewriter.optimize(model, x, budget=0.01)
    (d,) = opt.plan.decisions
    assert d.variant not in ("dense", "original"), str(opt.plan)
    assert d.predicted_speedup is not None and d.predicted_speedup > 1
    assert d.error is not None and opt.plan.error <= 0.01
    assert opt.plan.holdout_error is not None and opt.plan.holdout_error <= 0.02
    fresh = torch.randn(4, 300, 64)
    with torch.no_grad():
        assert rewriter.relative_l2(model(fresh), opt(fresh)) <= 0.02


def test_budget_zero_keeps_exact_rewrites_only():
    model = LocalAttention().eval()
    opt = rewriter.optimize(model, torch.randn(2, 300, 64), budget=0.0)
    (d,) = opt.plan.decisions
    assert d.variant == "dense", str(opt.plan)
    assert "exact" in d.reason
    assert opt.plan.error < 1e-5


def test_no_variant_meets_a_tiny_budget_all_dense_with_reason():
    model = LocalAttention(slope=0.0).eval()  # nothing local about it: every cheap variant errs
    opt = rewriter.optimize(model, torch.randn(2, 300, 64), budget=1e-6,
                            variants=["dense", "sliding_window", "block_sparse"])
    (d,) = opt.plan.decisions
    assert d.variant == "dense"
    assert "no candidate fits" in d.reason, d.reason


@pytest.mark.parametrize("budget,exc", [(-1, ValueError), (-0.5, ValueError), ("0.1", TypeError),
                                        (float("nan"), TypeError)])
def test_bad_budget_is_an_error(budget, exc):
    with pytest.raises(exc, match="budget"):
        rewriter.optimize(LocalAttention().eval(), torch.randn(1, 300, 64), budget=budget)


def test_unknown_variant_lists_the_catalogue():
    with pytest.raises(ValueError) as e:
        rewriter.optimize(LocalAttention().eval(), torch.randn(1, 300, 64), variants=["slidng_window"])
    assert all(name in str(e.value) for name in available())


@pytest.mark.parametrize("params,match", [({"windw": 8}, "takes no parameter 'windw'"),
                                           ({"window": "8"}, "must be int"), ({"window": 0}, ">= 1")])
def test_bad_parameters_fail_when_planning(params, match):
    with pytest.raises(ValueError, match=match):
        rewriter.optimize(LocalAttention().eval(), torch.randn(1, 300, 64), variants={"sliding_window": params})


def test_calibration_that_does_not_fit_fails_before_any_work(monkeypatch):
    import passes.pipeline as pipeline

    def no_capture(*a, **k):
        raise AssertionError("captured before checking the calibration inputs")

    monkeypatch.setattr(pipeline, "analyse", no_capture)
    model = LocalAttention().eval()
    with pytest.raises(ValueError, match="calibration sample 1"):
        rewriter.optimize(model, torch.randn(2, 300, 64),
                          calibration=[torch.randn(2, 300, 64), torch.randn(2, 200, 64)])
    with pytest.raises(ValueError, match="calibration sample 0 does not fit"):
        rewriter.optimize(model, torch.randn(2, 300, 64), calibration=[{"y": torch.randn(2, 300, 64)}])


def test_forced_variant_that_does_not_apply_leaves_the_site_dense_with_the_reason():
    model = CrossAttention().eval()
    inputs = (torch.randn(2, 9, 32), torch.randn(2, 13, 32))
    opt = rewriter.optimize(model, inputs, variants={"sliding_window": {"window": 4}}, budget=None)
    (d,) = opt.plan.decisions
    assert d.variant == "dense"
    assert "cross-attention" in d.reason, d.reason
    with torch.no_grad():
        assert rewriter.relative_l2(model(*inputs), opt(*inputs)) < 1e-5


def test_forced_variant_with_no_gate_runs_that_variant():
    model = LocalAttention().eval()
    x = torch.randn(2, 300, 64)
    opt = rewriter.optimize(model, x, variants={"sliding_window": {"window": 64}}, budget=None)
    (d,) = opt.plan.decisions
    assert (d.variant, d.params["window"]) == ("sliding_window", 64)
    assert d.error is not None and d.error > 0  # measured, not assumed
    assert opt.plan.error is not None


def test_learned_map_is_not_fitted_where_its_kernel_refuses_the_mask(monkeypatch):
    """Fitting costs seconds per site: a mask the linear kernel refuses leaves the site dense, unfitted, with why."""
    import passes.fitting

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted a feature map the kernel cannot run")

    monkeypatch.setattr(passes.fitting, "fit_hedgehog", no_fit)
    x = torch.randn(4, 64, 16)
    am = torch.ones(4, 64, dtype=torch.long)
    am[1, 40:] = 0
    opt = rewriter.optimize(RowPaddedAttention().eval(), {"x": x, "attention_mask": am},
                            variants={"linear": {"feature_map": "hedgehog"}}, budget=None, dynamic=False)
    (d,) = opt.plan.decisions
    assert d.variant == "dense"
    assert "key-padding" in d.reason, d.reason


def test_gain_is_not_measured_on_an_option_that_is_exact_up_to_rounding():
    """A probe whose site error is float rounding measures noise; the gain comes from the next option."""
    from passes.planner import Candidate, SitePlan, _probe_gains
    from passes.site import AttentionSite

    site = AttentionSite(name="s", index=0, spelling="sdpa", causal=False, mask_kind="padding", is_cross=False,
                         num_heads=2, num_kv_heads=2, head_dim=8, v_head_dim=8, q_len=64, kv_len=64, batch=1,
                         scale=8 ** -0.5)
    opts = [Candidate("block_sparse", {"keep": keep}, t, error=err)
            for keep, t, err in ((0.125, 1.0, 0.3), (0.5, 2.0, 0.04), (0.75, 3.0, 1e-7))]
    sp = SitePlan(site, Candidate("dense", {}, 4.0, exact=True, error=0.0), opts)
    by_keep = {c.params["keep"]: c.error for c in opts}

    def evaluate(assignment):  # half of a site's error reaches the output; rounding-sized errors vanish in it
        variant, params = assignment[0]
        err = by_keep[params["keep"]] if variant == "block_sparse" else 0.0
        return 1e-6 + (0.5 * err if err > 1e-5 else 0.0), None

    _probe_gains([sp], [[]], evaluate, base=1e-6, say=lambda msg: None)
    assert sp.gain == pytest.approx(0.5)


def test_plan_round_trips_through_json():
    model = LocalAttention().eval()
    opt = rewriter.optimize(model, torch.randn(2, 300, 64), budget=0.01)
    again = rewriter.Plan.from_json(opt.plan.to_json())
    assert again == opt.plan
    assert "held-out" in str(opt.plan)


@pytest.mark.parametrize("n", [9, 300])
def test_native_windows_become_sliding_window_exactly(n):
    from tests import gap_models as g

    torch.manual_seed(0)
    model = g.MixedLocalGlobal(layers=4, window=3).eval()
    x = torch.randn(2, n, g.E)
    opt = rewriter.optimize(model, x, budget=0.0)
    got = [(d.variant, d.params.get("window")) for d in opt.plan.decisions]
    assert got == [("dense", None), ("sliding_window", 3)] * 2, str(opt.plan)
    assert all(d.error == 0.0 for d in opt.plan.decisions)
    # the band is run by the kernel, not passed as a mask
    ops = [nd for nd in opt.program.graph.nodes if "rewriter.attention" in str(nd.target)]
    windowed = [nd for nd in ops if "sliding_window" in str(nd.args)]
    assert windowed and all(nd.args[3] is None and nd.args[5] is True for nd in windowed)
    fresh = torch.randn(2, n, g.E)
    with torch.no_grad():
        assert rewriter.relative_l2(model(fresh), opt(fresh)) < 1e-5


def test_variants_list_with_parameters_says_how_to_give_them():
    import pytest as _pytest

    from passes.planner import normalise_variants

    with _pytest.raises(TypeError, match="as a dict"):
        normalise_variants([("sliding_window", {"window": 4})])
