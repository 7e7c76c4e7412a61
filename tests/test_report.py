"""report.md: the plan, measured figures, attention time by length with a plot (or a line saying why not)."""
from __future__ import annotations

import builtins
import sys

import pytest
import torch

import rewriter
from rewriter.report import summarize, time_interleaved, write_report
from tests.builders import Causal


@pytest.fixture(scope="module")
def opt():
    torch.manual_seed(0)
    return rewriter.optimize(Causal(h=2).eval(), (torch.randn(1, 256, 32),), budget=None,
                             variants={"sliding_window": {"window": 32}})


def test_summary_is_median_with_quartiles():
    t = summarize([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (t.median, t.low, t.high, t.reps) == (3.0, 1.0, 5.0, 5)
    assert t.q1 == 2.0 and t.q3 == 4.0
    assert "IQR" in str(t)


def test_interleaved_timing_runs_every_callable():
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    got = time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, reps=4, warmup=1)
    assert calls == {"a": 5, "b": 5} and got["a"].reps == 4


def test_report_with_plot(opt, tmp_path):
    pytest.importorskip("matplotlib")
    path = write_report(opt, tmp_path, measured={"end-to-end speedup": "1.23x"}, max_seconds=10)
    text = path.read_text()
    assert "sliding_window" in text and "end-to-end speedup: 1.23x" in text
    assert "| sliding_window(block=64,window=32) | 256 |" in text  # measured row at the site's length
    assert "![attention time by sequence length](attention_time.png)" in text
    png = (tmp_path / "attention_time.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "prefers it over dense" in text


def test_report_without_matplotlib_says_so(opt, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    for mod in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, mod)
    text = write_report(opt, tmp_path, max_seconds=5).read_text()
    assert "Plot not written: matplotlib is not installed" in text
    assert not (tmp_path / "attention_time.png").exists()
    assert "| dense | 256 |" in text  # the figures are still there as a table


def test_curves_predict_the_shape_they_measure():
    """Curves are measured on batch 1: the predictions beside them are for batch 1 too, whatever the site's batch."""
    import dataclasses

    from passes import pricing
    from passes.plan import Decision, Plan
    from passes.site import AttentionSite
    from rewriter.report import attention_curves

    site = AttentionSite(name="a", index=0, spelling="sdpa", causal=True, mask_kind="causal", is_cross=False,
                         num_heads=2, num_kv_heads=2, head_dim=16, v_head_dim=16, q_len=128, kv_len=128, batch=8,
                         scale=0.25)
    plan = Plan((Decision(site, "sliding_window", {"window": 16}),), target="cpu", budget=None)
    hw = pricing.profile("cpu")
    for c in attention_curves(plan, reps=1):
        for n, predicted in zip(c.lengths, c.predicted):
            one = pricing.seconds(dataclasses.replace(site, batch=1), c.variant, c.params, hw, length=n)
            assert predicted == pytest.approx(one), (c.label, n)
