"""``optimize`` works the way inference code calls it: under no_grad, inference_mode, grad disabled globally, or not.

Fitting (learned feature maps) and weight surgery (latent, merged KV heads) need gradients or fresh
parameters; they must work in every mode and leave the caller's mode as it was.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import rewriter
from rewriter import lm

MODES = {
    "grad": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "grad_disabled_globally": None,  # torch.set_grad_enabled(False) for the rest of the script
}

FORCED = {
    "linear": {"feature_map": "hedgehog"},
    "latent": {"rank": 4},
    "gqa_merge": {"groups": 2},
}


def _model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = lm.TinyLM(lm.LMConfig(context=96, dim=32, layers=2, heads=4)).eval()
    return model, torch.randint(0, 256, (2, 96))


def _state() -> tuple[bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", list(FORCED))
def test_forced_fitting_and_surgery_in_every_grad_mode(mode, variant):
    model, ids = _model()
    with torch.no_grad():
        ref = model(ids)
    prev = torch.is_grad_enabled()
    ctx = MODES[mode]
    try:
        if ctx is None:
            torch.set_grad_enabled(False)
            ctx = contextlib.nullcontext
        with ctx():
            before = _state()
            opt = rewriter.optimize(model, ids, variants={variant: FORCED[variant]}, budget=None, dynamic=False)
            assert _state() == before, f"optimize changed the caller's grad mode: {before} -> {_state()}"
            out = opt(ids)
    finally:
        torch.set_grad_enabled(prev)
    assert {d.variant for d in opt.plan.decisions} == {variant}, str(opt.plan)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # an approximation of a random model: close, not equal; a crash or garbage fails here
    assert rewriter.relative_l2(ref, out) < 0.5, rewriter.relative_l2(ref, out)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_budgeted_plan_under_inference_modes_matches_grad_mode(mode):
    """The same plan whatever the mode: the mode changes nothing the planner measures."""
    model, ids = _model()
    variants = ["dense", "sliding_window", "linear"]
    plans = {}
    for m in ("grad", mode):
        with MODES[m]():
            opt = rewriter.optimize(model, ids, budget=0.05, metric="l2", variants=variants, dynamic=False)
        plans[m] = [(d.variant, d.params) for d in opt.plan.decisions]
    assert plans["grad"] == plans[mode]
