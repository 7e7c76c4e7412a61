"""Every spelling of attention is found once, with the right flags, and rewritten exactly."""
from __future__ import annotations

import pytest
import torch

import rewriter
from tests.spellings import CASES

FIELDS = ("causal", "is_cross", "num_heads", "num_kv_heads", "head_dim", "q_len", "kv_len", "mask_kind", "batch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_found_with_flags(case):
    model, inputs = case.build()
    model.eval()
    sites = rewriter.find_attention(model, inputs)
    assert len(sites) == len(case.expect), [s.describe() for s in sites]
    for site, want in zip(sites, case.expect):
        got = {f: getattr(site, f) for f in FIELDS}
        assert got == {f: want[f] for f in FIELDS}, site.describe()
        assert site.rewritable, site.reason


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_dense_rewrite_is_exact(case):
    model, inputs = case.build()
    model.eval()
    opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
    assert [d.variant for d in opt.plan.decisions] == ["dense"] * len(case.expect), str(opt.plan)
    ops = [n for n in opt.program.graph.nodes if "rewriter.attention" in str(n.target)]
    assert len(ops) == len(case.expect)
    # Fresh inputs of the same shapes, not the calibration ones.
    torch.manual_seed(1)
    fresh = tuple(
        (torch.randn_like(t) if t.is_floating_point() else t) if isinstance(t, torch.Tensor) else t for t in inputs
    )
    with torch.no_grad():
        ref, out = model(*fresh), opt(*fresh)
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_rewrite_removes_the_original_softmax():
    case = next(c for c in CASES if c.name == "padding_f32_dropout")
    model, inputs = case.build()
    opt = rewriter.optimize(model.eval(), inputs, variants=["dense"], budget=None)
    names = {str(n.target) for n in opt.program.graph.nodes}
    assert not any("softmax" in t or "dropout" in t for t in names), names


def test_half_precision_softmax_in_float32_is_found_and_close():
    from tests.spellings import PaddingBoolFloat32Dropout, _keep, _x

    torch.manual_seed(0)
    model = PaddingBoolFloat32Dropout().half().eval()
    inputs = (_x().half(), _keep())
    (site,) = rewriter.find_attention(model, inputs)
    assert site.mask_kind == "padding" and site.rewritable
    opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
    assert opt.plan.decisions[0].variant == "dense"
    with torch.no_grad():
        ref = model.float()(inputs[0].float(), inputs[1])
        model.half()
        out = opt(*inputs).float()
        half = model(*inputs).float()
    # The rewrite is no further from float32 math than the original half-precision model is.
    assert rewriter.relative_l2(ref, out) <= 2 * rewriter.relative_l2(ref, half) + 1e-3
