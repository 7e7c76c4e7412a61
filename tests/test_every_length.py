"""One artifact for every length (issue 14, item 3): LMs whose causal mask is built from the runtime length
(arange comparisons, triu(ones(T, T))) are captured once with a dynamic length, and the artifact, loaded in a
fresh process, serves every length from 1 to max_len, exact with ``dense`` and equal to the window reference
with a forced ``sliding_window``."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
from passes.capture import graph_context
from passes.dynamic import capture_dynamic, length_adaptive
from passes.find import find_matches
from passes.pricing import profile
from tests.length_lms import LengthMaskLM, window_reference

EXAMPLE = 16
LENGTHS = (1, 7, EXAMPLE, 77, 4 * EXAMPLE)
WINDOW = 4


def _model(spelling: str, **kw) -> LengthMaskLM:
    torch.manual_seed(0)
    return LengthMaskLM(spelling, **kw).eval()


@pytest.mark.parametrize("spelling", ["arange", "triu"])
def test_one_artifact_serves_every_length_in_a_fresh_process(spelling, tmp_path):
    model = _model(spelling)
    ids = torch.randint(0, 64, (1, EXAMPLE))
    arts = {}
    for name, variants in (("dense", ["dense"]), ("window", {"sliding_window": {"window": WINDOW}})):
        opt = rewriter.optimize(model, ids, variants=variants, budget=None)
        assert opt.lengths is not None and (opt.lengths.low, opt.lengths.high) == (1, 128), str(opt.plan)
        assert any("serves sequence lengths 1..128 (the model's position limit)" in n for n in opt.plan.notes)
        assert all(d.variant == ("dense" if name == "dense" else "sliding_window") for d in opt.plan.decisions)
        arts[name] = rewriter.export(opt, tmp_path / name)
    torch.manual_seed(1)
    inputs = {n: torch.randint(0, 64, (1, n)) for n in LENGTHS}
    torch.save(inputs, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import json, torch, rewriter
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        served = {{}}
        for name in ("dense", "window"):
            m = rewriter.load({str(tmp_path)!r} + "/" + name)
            with torch.no_grad():
                outs = {{n: m(x) for n, x in ids.items()}}
            torch.save(outs, {str(tmp_path)!r} + f"/out_{{name}}.pt")
            served[name] = [m.lengths.low, m.lengths.high]
        print(json.dumps(served))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"dense": [1, 128], "window": [1, 128]}
    dense, window = torch.load(tmp_path / "out_dense.pt"), torch.load(tmp_path / "out_window.pt")
    for n, x in inputs.items():
        with torch.no_grad():
            ref = model(x)
        assert dense[n].shape == ref.shape == (1, n, 64)
        assert (dense[n] - ref).abs().max() < 1e-5, n
        assert (window[n] - window_reference(model, x, WINDOW)).abs().max() < 1e-5, n
    # the window really changes the output at lengths past it
    assert (window[4 * EXAMPLE] - dense[4 * EXAMPLE]).abs().max() > 1e-3


def test_dynamic_capture_classifies_length_built_masks_like_the_static_one():
    for spelling in ("arange", "triu"):
        model = _model(spelling, layers=1)
        ids = torch.randint(0, 64, (1, EXAMPLE))
        static = rewriter.find_attention(model, ids)
        ep, rng = capture_dynamic(model, {"ids": ids}, 128)
        ctx = graph_context(ep)
        ctx.dynamic = True
        matches, _ = find_matches(ctx)
        assert [(m.site.mask_kind, m.site.causal) for m in matches] == [("causal", True)], spelling
        assert [(s.mask_kind, s.causal) for s in static] == [("causal", True)]
        assert rng.low == 1


def test_beyond_max_len_is_a_clear_error_and_the_plan_says_the_range(tmp_path):
    model = _model("arange")
    ids = torch.randint(0, 64, (1, EXAMPLE))
    opt = rewriter.optimize(model, ids, variants=["dense"], budget=None, max_len=32)
    assert "one program serves sequence lengths 1..32 (declared max_len)" in opt.plan.notes, opt.plan.notes
    loaded = rewriter.load(rewriter.export(opt, tmp_path / "art"))
    x = torch.randint(0, 64, (1, 33))
    with torch.no_grad():
        assert (loaded(x[:, :32]) - model(x[:, :32])).abs().max() < 1e-5
        with pytest.raises(RuntimeError, match=r"sequence length 33 is beyond this program's max_len=32"):
            loaded(x)


@pytest.mark.parametrize("bad", [0, -3, 8, 2.5, True, "64"])
def test_max_len_is_validated(bad):
    model = _model("triu", layers=1)
    with pytest.raises(ValueError, match="max_len"):
        rewriter.optimize(model, torch.randint(0, 64, (1, EXAMPLE)), variants=["dense"], budget=None, max_len=bad)


def test_default_max_len_without_a_position_limit_is_8x_the_example():
    model = _model("triu", layers=1, positions=None)
    opt = rewriter.optimize(model, torch.randint(0, 64, (1, EXAMPLE)), variants=["dense"], budget=None)
    assert opt.lengths is not None and opt.lengths.high == 8 * EXAMPLE, str(opt.plan)
    assert any("(8x the example length)" in n for n in opt.plan.notes)
    with torch.no_grad():
        x = torch.randint(0, 64, (1, 8 * EXAMPLE))
        assert (opt(x) - model(x)).abs().max() < 1e-5
    assert opt._by_shape == {}  # served by the one program


def test_planned_variant_runs_dense_beyond_its_calibrated_range():
    """A budgeted plan was measured at the example length only: past it the site runs exact dense."""
    model = _model("arange", layers=1)
    ids = torch.randint(0, 64, (1, EXAMPLE))
    forced = rewriter.optimize(model, ids, variants={"sliding_window": {"window": WINDOW}}, budget=None,
                               dynamic=False)
    matches, _ = find_matches(graph_context(torch.export.export(model, (), {"ids": ids}, strict=False)))
    got = length_adaptive(model, {"ids": ids}, matches, forced.plan.decisions, profile("cpu"), 128, calibrated=EXAMPLE)
    assert got is not None
    ep, _, schedules = got
    assert schedules == {0: [[0, "dense", {}], [EXAMPLE, "sliding_window", forced.plan.decisions[0].params],
                             [EXAMPLE + 1, "dense", {}]]}
    run = ep.module()
    with torch.no_grad():
        for n in (1, EXAMPLE - 1, EXAMPLE + 1, 77):
            x = torch.randint(0, 64, (1, n))
            assert (run(ids=x) - model(x)).abs().max() < 1e-5, n
        assert (run(ids=ids) - window_reference(model, ids, WINDOW)).abs().max() < 1e-5
