"""A calibration a busy machine cannot corrupt: contention, uneven rounds and failed timings cache nothing."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from codegen import hw_calibrate
from cost_model import hardware


def _round(scale: float = 1.0, **over) -> dict:
    base = {"mac_per_s": 1e11, "exp_per_s": 1e9, "other_per_s": 1e10, "read_bytes_per_s": 2e10,
            "write_bytes_per_s": 4e9, "cache_bytes_per_s": 5e10, "launch_s": 3e-6,
            "factor_dense": 0.6, "factor_linear": 1.5, "gemm_table": [[64, 64, 64, 1e11]]}
    out = {k: (v * scale if isinstance(v, float) and k != "launch_s" else v) for k, v in base.items()}
    out.update(over)
    return out


def test_agreeing_quiet_rounds_are_accepted_as_medians():
    rounds = [_round(1.0), _round(1.1), _round(3.0)]  # one odd round: the other two agree
    out, problems = hw_calibrate.combine(rounds, [0.0, 0.05, 0.0])
    assert problems == []
    assert out["mac_per_s"] == pytest.approx(1.1e11)
    assert out["gemm_table"][0][3] == pytest.approx(1e11)


def test_contention_refuses():
    _, problems = hw_calibrate.combine([_round()] * 3, [0.0, 0.9, 0.0])
    assert any("cores busy" in p for p in problems)


def test_rounds_that_never_agree_refuse():
    _, problems = hw_calibrate.combine([_round(1.0), _round(1.6), _round(2.6)], [0.0] * 3)
    assert any("agreed" in p for p in problems), problems


def test_a_factor_at_its_old_clamp_is_a_failed_calibration():
    _, problems = hw_calibrate.combine([_round(factor_linear=14.0)] * 3, [0.0] * 3)
    assert any("factor_linear" in p for p in problems), problems
    _, problems = hw_calibrate.combine([_round(factor_dense=0.05)] * 3, [0.0] * 3)
    assert any("factor_dense" in p for p in problems), problems


def test_measure_retries_then_refuses(monkeypatch):
    calls = {"rounds": 0, "waits": 0}

    class Busy:
        def start(self):
            return self

        def cores(self):
            return 1.0

    def fake_round(quick, say):
        calls["rounds"] += 1
        return _round()

    def fake_wait(*a, **k):
        calls["waits"] += 1
        return 1.0

    monkeypatch.setattr(hw_calibrate, "Contention", Busy)
    monkeypatch.setattr(hw_calibrate, "_measure_round", fake_round)
    monkeypatch.setattr(hw_calibrate, "wait_quiet", fake_wait)
    monkeypatch.setattr(hw_calibrate, "others_cores", lambda *a: 1.0)
    with pytest.raises(hardware.CalibrationRefused, match="cores busy"):
        hw_calibrate.measure(quick=True, rounds=3, attempts=2)
    assert calls["rounds"] == 6 and calls["waits"] >= 1


def test_refused_calibration_caches_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_REWRITER_CACHE", str(tmp_path))

    def refuse():
        raise hardware.CalibrationRefused(["other processes kept 1.0 cores busy while it measured"])

    hw = hardware.cpu_profile(refresh=True, measure=refuse)
    assert not hardware.cache_path().exists()
    assert hw.source.startswith("generic") and "refused" in hw.note and "cores busy" in hw.note
    assert hardware.profile_note(hw) == hw.note


def test_refused_calibration_keeps_the_last_good_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_REWRITER_CACHE", str(tmp_path))
    good = {k: v for k, v in _round().items()}
    hardware.cpu_profile(refresh=True, measure=lambda: good)
    before = hardware.cache_path().read_text()

    def refuse():
        raise hardware.CalibrationRefused(["no two rounds of 3 figure(s) agreed within 1.25x"])

    hw = hardware.cpu_profile(refresh=True, measure=refuse)
    assert hardware.cache_path().read_text() == before
    assert hw.source.startswith("measured") and hw.mac_per_s == pytest.approx(1e11)
    assert "refused" in hw.note and "agreed" in hw.note


def test_plan_notes_a_refused_calibration(tmp_path, monkeypatch):
    import torch

    import rewriter
    from passes import pricing
    from tests.spellings import CASES

    monkeypatch.setenv("ATTENTION_REWRITER_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTENTION_REWRITER_CALIBRATE", "1")
    monkeypatch.setattr(hw_calibrate, "_REFUSED", {})

    def refuse(**kw):
        raise hardware.CalibrationRefused(["other processes kept 1.2 cores busy while it measured"])

    monkeypatch.setattr(hw_calibrate, "measure", refuse)
    pricing.profile.cache_clear()
    try:
        case = next(c for c in CASES if c.name == "matmul_div")
        model, inputs = case.build()
        with torch.no_grad():
            plan = rewriter.optimize(model.eval(), inputs, variants=["dense"]).plan
    finally:
        pricing.profile.cache_clear()
    assert any("calibration was refused" in n and "1.2 cores busy" in n for n in plan.notes), plan.notes
    assert plan.calibrated is False and not hardware.cache_path().exists()


def test_the_api_calibrates_on_first_use(tmp_path, monkeypatch):
    """A real quick calibration through optimize, in a fresh process: cached, or refused with its reason."""
    code = (
        "import torch, rewriter\n"
        "from tests.spellings import CASES\n"
        "c = next(c for c in CASES if c.name == 'matmul_div'); m, x = c.build()\n"
        "p = rewriter.optimize(m.eval(), x, variants=['dense']).plan\n"
        "print('NOTES', repr(p.notes)); print('CAL', p.calibrated)\n")
    env = {**__import__("os").environ, "ATTENTION_REWRITER_CACHE": str(tmp_path), "ATTENTION_REWRITER_CALIBRATE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    took = time.perf_counter() - t0
    cached = hardware.cache_path().name
    path = tmp_path / cached
    if "CAL True" in out.stdout:
        data = json.loads(path.read_text())
        assert data["measured"]["quick"] == 1.0 and data["measured"]["rounds"] == 3.0
        assert took < 120
    else:  # refused on a busy machine: nothing cached and the plan says why
        assert not path.exists() and "refused" in out.stdout, out.stdout
