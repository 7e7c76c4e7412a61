"""The project's own trained LM, as inference code calls the planner: defaults under no_grad, and a perplexity
budget."""
from __future__ import annotations

import pytest
import torch

import rewriter
from passes import pricing
from rewriter import lm

pytestmark = pytest.mark.skipif(not lm.CHECKPOINT.exists(), reason="the trained checkpoint is not in this checkout")


def predicted_attention_ratio(plan) -> float:
    """Predicted attention time of the plan over all-dense attention, summed over sites."""
    hw = pricing.profile(plan.target)
    planned = dense = 0.0
    for d in plan.decisions:
        t_dense = pricing.seconds(d.site, "dense", {}, hw)
        t = t_dense if d.variant in ("dense", "original") else pricing.seconds(d.site, d.variant, d.params, hw)
        planned, dense = planned + t, dense + t_dense
    return planned / dense


def _data():
    model = lm.load()
    n = model.cfg.context
    calib = lm.windows(lm.corpus("train"), n - 1, 4, seed=7)  # 4 x 1024 bytes of training text
    held = lm.windows(lm.corpus("heldout"), n, 8, seed=1)  # held-out prose, never seen by the planner
    return model, calib, held


def _report(opt, model, held) -> tuple[float, float]:
    print(opt.plan)
    ppl0, ppl1 = lm.perplexity(model, held), lm.perplexity(opt, held)
    ratio = predicted_attention_ratio(opt.plan)
    print(f"metric {opt.plan.metric}: held-out perplexity {ppl0:.3f} -> {ppl1:.3f} ({100 * (ppl1 / ppl0 - 1):+.2f}%); "
          f"predicted attention time {100 * ratio:.0f}% of dense")
    return ppl1 / ppl0 - 1, ratio


@pytest.mark.slow  # about 3 minutes on 2 cores; test_inference_mode checks no_grad planning in the default tier
def test_defaults_under_no_grad_keep_perplexity_within_one_percent():
    model, calib, held = _data()
    with torch.no_grad():  # as inference scripts call it
        opt = rewriter.optimize(model, calib)
    rise, ratio = _report(opt, model, held)
    assert opt.plan.metric == "kl" and "causal LM" in opt.plan.metric_reason
    assert any(d.variant not in ("dense", "original") for d in opt.plan.decisions), str(opt.plan)
    assert opt.plan.error <= opt.plan.budget
    assert rise <= 0.01
    assert ratio < 1.0


def test_perplexity_budget_holds_on_held_out_text():
    model, calib, held = _data()
    opt = rewriter.optimize(model, calib, metric="perplexity", budget=0.02)
    rise, _ = _report(opt, model, held)
    assert opt.plan.metric == "perplexity" and opt.plan.error <= 0.02
    assert any(d.variant not in ("dense", "original") for d in opt.plan.decisions), str(opt.plan)
    assert rise <= 0.025
