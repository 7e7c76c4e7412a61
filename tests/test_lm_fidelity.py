"""The project's own trained LM: at budget 0.05 and its trained context, perplexity barely moves and attention gets cheaper."""
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


def test_budgeted_plan_keeps_perplexity_and_cuts_attention_time():
    torch.manual_seed(0)
    model = lm.load()
    n = model.cfg.context
    calib = lm.windows(lm.corpus("train"), n - 1, 4, seed=7)  # 4 x 1024 bytes of training text
    held = lm.windows(lm.corpus("heldout"), n, 8, seed=1)  # held-out prose, never seen by the planner
    opt = rewriter.optimize(model, calib, budget=0.05)
    print(opt.plan)
    ppl0 = lm.perplexity(model, held)
    ppl1 = lm.perplexity(opt, held)
    ratio = predicted_attention_ratio(opt.plan)
    print(f"held-out perplexity {ppl0:.3f} -> {ppl1:.3f} ({100 * (ppl1 / ppl0 - 1):+.2f}%); "
          f"predicted attention time {100 * ratio:.0f}% of dense")
    assert any(d.variant not in ("dense", "original") for d in opt.plan.decisions), str(opt.plan)
    assert opt.plan.error <= 0.05
    assert ppl1 <= 1.02 * ppl0
    assert ratio <= 0.60
