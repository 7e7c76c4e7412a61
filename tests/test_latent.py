"""Latent weight surgery on real weights: fewer parameters, by the amount the plan reports, and the op runs
the latent kernel."""
from __future__ import annotations

import re

import torch

import rewriter
from codegen.ops import recording
from codegen.variants import latent as latent_kernel
from passes import metrics
from rewriter import models


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_latent_surgery_on_minilm_removes_the_reported_parameters():
    model, inputs = models.minilm()
    opt = rewriter.optimize(model, inputs, variants={"latent": {"rank": 16}}, budget=None)
    assert [d.variant for d in opt.plan.decisions] == ["latent"] * 6, str(opt.plan)
    before = _params(model)
    after = sum(t.numel() for t in opt.program.state_dict.values())
    (note,) = [n for n in opt.plan.notes if n.startswith("latent weight surgery")]
    reported = int(re.search(r"\(([\d,]+) fewer\)", note).group(1).replace(",", ""))
    assert after < before and before - after == reported, (before, after, note)
    # per site, K and V (12 heads x 32): a 384->384 Linear with bias becomes 384->12*16 with bias plus 12x16x32 up
    assert reported == 6 * 2 * ((384 * 384 + 384) - (384 * 192 + 192 + 12 * 16 * 32))
    with torch.no_grad(), recording() as calls:
        out = opt(**inputs)
    lat = [c for c in calls if c["variant"] == "latent"]
    assert len(lat) == 6 and all(c["k"].shape[-1] == 16 for c in lat)  # attention reads rank-16 K/V
    for c in lat:
        ref = latent_kernel.reference(c["q"], c["k"], c["v"], c["mask"], c["scale"], c["causal"], extra=c["extra"])
        assert rewriter.relative_l2(ref, c["out"]) < 1e-5
    # the planner measured the same math (probe kernels) before the surgery, on the same row split:
    # rows 0-1 calibrate (and fit the bases), row 2 is held out
    with torch.no_grad():
        ref = model(**inputs)
    pad = inputs["attention_mask"].bool()
    for rows, planned in (([0, 1], opt.plan.error), ([2], opt.plan.holdout_error)):
        got = metrics.error(metrics.select_rows(ref, rows, 3), metrics.select_rows(out, rows, 3), None, pad[rows])
        assert abs(got - planned) <= 1e-3 * planned + 1e-5, (rows, got, planned)


def test_gqa_merge_on_minilm_halves_kv_projections_and_runs_gqa():
    model, inputs = models.minilm()
    opt = rewriter.optimize(model, inputs, variants={"gqa_merge": {"groups": 6}}, budget=None)
    assert [d.variant for d in opt.plan.decisions] == ["gqa_merge"] * 6, str(opt.plan)
    before = _params(model)
    after = sum(t.numel() for t in opt.program.state_dict.values())
    assert before - after == 6 * 2 * (384 * 192 + 192), (before, after)  # K and V: 12 -> 6 heads of 32
    with torch.no_grad(), recording() as calls:
        out = opt(**inputs)
    merged = [c for c in calls if c["variant"] == "gqa_merge"]
    assert len(merged) == 6 and all(c["k"].shape[1] == 6 and c["q"].shape[1] == 12 for c in merged)
    with torch.no_grad():
        ref = model(**inputs)
    pad = inputs["attention_mask"].bool()
    got = metrics.error(metrics.select_rows(ref, [0, 1], 3), metrics.select_rows(out, [0, 1], 3), None, pad[[0, 1]])
    assert abs(got - opt.plan.error) <= 1e-3 * opt.plan.error + 1e-5, (got, opt.plan.error)


class _OwnProjection(torch.nn.Module):
    """A projection written by hand: a ``weight`` parameter applied with F.linear, not an nn.Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class _HandAttention(torch.nn.Module):
    def __init__(self, dim: int = 48, heads: int = 3):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = torch.nn.Linear(dim, dim), _OwnProjection(dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.h, d // self.h).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


def test_latent_refuses_a_projection_that_is_not_an_nn_linear():
    """The surgery replaces an nn.Linear; a hand-written projection module keeps its site, with the reason."""
    torch.manual_seed(0)
    model = _HandAttention().eval()
    x = torch.randn(2, 37, 48)
    opt = rewriter.optimize(model, (x,), variants=["latent"], budget=None)
    (d,) = opt.plan.decisions
    assert d.variant in ("dense", "original"), str(opt.plan)
    assert "not an nn.Linear" in str(opt.plan), str(opt.plan)
    with torch.no_grad():
        assert torch.allclose(opt(x), model(x), atol=1e-5)
