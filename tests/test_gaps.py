"""Regression tests for the gaps a new user hit, each written the way the user's model was."""
from __future__ import annotations

import pytest
import torch

import rewriter
from tests import gap_models as g


def _fresh(inputs, seed=7):
    torch.manual_seed(seed)
    return tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)


def _exact(model, inputs, n_sites=1):
    opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
    assert [d.variant for d in opt.plan.decisions] == ["dense"] * n_sites, str(opt.plan)
    fresh = _fresh(inputs)
    with torch.no_grad():
        ref, out = model(*fresh), opt(*fresh)
    assert not torch.isnan(out).any() or torch.isnan(ref).any()
    assert rewriter.relative_l2(ref, out) < 1e-5
    return opt


def _one(model, inputs):
    (site,) = rewriter.find_attention(model, inputs)
    assert site.rewritable, site.reason
    return site


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_alibi_flattened_baddbmm_runs_and_is_exact():
    model, inputs = g.AlibiBaddbmm().eval(), (g.x_(), g.keep_().long())
    site = _one(model, inputs)
    assert site.has_bias and site.mask_kind == "additive" and site.batch == g.B and site.num_heads == g.H
    _exact(model, inputs)


def test_soft_capping_is_found_and_carried():
    model, inputs = g.SoftCap(cap=5.0).eval(), (g.x_(),)
    site = _one(model, inputs)
    assert site.softcap == pytest.approx(5.0) and site.causal and site.num_kv_heads == 2
    assert site.scale == pytest.approx(0.3)
    opt = _exact(model, inputs)
    (op,) = [n for n in opt.program.graph.nodes if "rewriter.attention" in str(n.target)]
    assert op.args[9] == pytest.approx(5.0)


def test_bias_before_soft_cap_stays_with_reason():
    class BiasThenCap(g.Attn):
        def forward(self, x, bias):
            q, k, v = self.qkv(x)
            s = torch.tanh((q @ k.transpose(-1, -2) + bias) / 4.0) * 4.0
            return self.o(g._merge(s.softmax(-1) @ v))

    (site,) = rewriter.find_attention(BiasThenCap().eval(), (g.x_(), torch.randn(g.B, 1, g.N, g.N)))
    assert not site.rewritable and "soft-cap" in site.reason


def test_mqa_with_input_float_mask_is_found():
    model, inputs = g.MQAFloatMask().eval(), (g.x_(), g.keep_().long())
    site = _one(model, inputs)
    assert site.num_kv_heads == 1 and site.mask_kind == "padding"
    _exact(model, inputs)


def test_mask_from_an_outer_product_is_told_from_the_scores():
    class OuterMask(g.Attn):
        def forward(self, x, keep):
            q, k, v = self.qkv(x)
            pair = keep[:, None, :, None].float() @ keep[:, None, None, :].float()  # a product, not scores
            s = q @ k.transpose(-1, -2) / 3.0 + (1.0 - pair) * -1e4
            return self.o(g._merge(s.softmax(-1) @ v))

    model, inputs = OuterMask().eval(), (g.x_(), g.keep_())
    _one(model, inputs)
    _exact(model, inputs)


def test_native_sliding_window_is_causal_with_window():
    model, inputs = g.MistralWindow(window=4).eval(), (g.x_(),)
    site = _one(model, inputs)
    assert site.causal and site.window == 4 and "window=4" in site.describe()
    _exact(model, inputs)


def test_finite_fill_is_rewritten_exactly_including_fully_masked_rows():
    model, inputs = g.FiniteFill().eval(), (g.x_(), g.keep_(fully=True))
    site = _one(model, inputs)
    assert site.mask_kind == "padding"
    opt = _exact(model, inputs)
    (op,) = [n for n in opt.program.graph.nodes if "rewriter.attention" in str(n.target)]
    assert op.args[10] == pytest.approx(-1e9)
    with torch.no_grad():
        out = opt(*inputs)
    assert torch.isfinite(out).all()


def test_fill_value_computed_at_run_time():
    model, inputs = g.TensorFill().eval(), (g.x_(),)
    site = _one(model, inputs)
    assert site.causal and site.mask_kind == "causal"
    _exact(model, inputs)


def test_mixed_global_and_local_layers_keep_their_windows():
    model, inputs = g.MixedLocalGlobal(layers=4, window=3).eval(), (g.x_(),)
    sites = rewriter.find_attention(model, inputs)
    assert [(s.causal, s.window) for s in sites] == [(True, None), (True, 3)] * 2
    _exact(model, inputs, n_sites=4)


def test_varargs_forward_through_every_entry_point(tmp_path):
    model, inputs = g.Varargs().eval(), (g.x_(), g.keep_())
    opt = _exact(model, inputs)
    assert opt.plan.decisions[0].site.name == ""
    rewriter.export(opt, tmp_path / "art")
    loaded = rewriter.load(tmp_path / "art")
    with torch.no_grad():
        assert rewriter.relative_l2(model(*inputs), loaded(*inputs)) < 1e-5
        longer = (g.x_(12), g.keep_(12))
        assert rewriter.relative_l2(model(*longer), opt(*longer)) < 1e-5


def test_gqa_expanded_before_flattening_counts_kv_heads():
    model, inputs = g.FlatGQABmm().eval(), (g.x_(), g.keep_())
    site = _one(model, inputs)
    assert (site.num_heads, site.num_kv_heads, site.mask_kind) == (g.H, 2, "padding")
    _exact(model, inputs)


def test_where_with_full_like_fill_keeps_flags():
    model, inputs = g.CrossWhereFull().eval(), (g.x_(), g.x_(g.M), g.keep_(g.M))
    site = _one(model, inputs)
    assert site.is_cross and site.head_dim == g.D and site.kv_len == g.M and site.mask_kind == "padding"
    _exact(model, inputs)


def test_unsupported_modifier_names_the_op():
    class Clamped(g.Attn):
        def forward(self, x):
            q, k, v = self.qkv(x)
            s = (q @ k.transpose(-1, -2)).clamp(max=2.0)
            return self.o(g._merge(s.softmax(-1) @ v))

    model, inputs = Clamped().eval(), (g.x_(),)
    (site,) = rewriter.find_attention(model, inputs)
    assert not site.rewritable and "clamp" in site.reason and site.head_dim == g.D
    opt = rewriter.optimize(model, inputs)
    assert opt.plan.decisions[0].variant == "original" and "clamp" in opt.plan.decisions[0].reason
