"""Every plan exports: each variant and each fidelity lever (sinks, the Delta correction) is planned, exported,
loaded in a fresh process and matches the optimized module; a part that cannot be written never loses the plan."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
from rewriter import lm
from rewriter.artifact import ExportError
from tests import library_models as L

N = 80  # five key blocks of 16: room for windows, blocks and chunks at a small size


def _lm():
    torch.manual_seed(0)
    return lm.TinyLM(lm.LMConfig(context=128, dim=32, layers=2, heads=2)).eval()


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, N), generator=torch.Generator().manual_seed(seed))


def _vit():
    torch.manual_seed(0)
    return L.RegisterViT().eval()


def _pixels(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, L.IMG, L.IMG, generator=torch.Generator().manual_seed(seed))


PLANS = {
    "dense": (_lm, _ids, ["dense"]),
    "sliding_window_delta": (_lm, _ids, {"sliding_window": {"window": 16, "delta": 4}}),
    "sinks_window_delta": (_lm, _ids, {"sinks_window": {"window": 16, "sinks": 2, "delta": 4}}),
    "block_sparse_delta": (_lm, _ids, {"block_sparse": {"keep": 0.5, "block": 16, "delta": 4}}),
    "linear_elu1": (_lm, _ids, {"linear": {"feature_map": "elu1", "chunk": 16}}),
    "linear_taylor_window": (_lm, _ids, {"linear": {"feature_map": "taylor", "window": 16, "chunk": 16}}),
    "linear_hedgehog": (_lm, _ids, {"linear": {"feature_map": "hedgehog", "chunk": 16}}),
    "latent": (_lm, _ids, {"latent": {"rank": 8}}),
    "gqa_merge": (_lm, _ids, {"gqa_merge": {"groups": 1}}),
    "neighborhood_2d_delta": (_vit, _pixels, {"neighborhood_2d": {"kernel": [3, 3], "delta": 4}}),
}


def test_every_variant_and_lever_exports_and_loads_in_a_fresh_process(tmp_path):
    dirs = []
    for name, (build, inputs, variants) in PLANS.items():
        opt = rewriter.optimize(build(), inputs(0), variants=variants, budget=None)
        want = variants[0] if isinstance(variants, list) else next(iter(variants))
        assert [d.variant for d in opt.plan.decisions] == [want] * len(opt.plan.decisions), (name, str(opt.plan))
        art = rewriter.export(opt, tmp_path / name)
        meta = json.loads((art / "plan.json").read_text())
        assert meta["kernel_failures"] == {}, (name, meta["kernel_failures"])
        fixes = {int(i): c for i, c in meta["corrections"].items()}
        has_delta = "delta" in (variants.get(want, {}) if isinstance(variants, dict) else {})
        assert bool(fixes) == has_delta and all(c["delta"] == 4 for c in fixes.values()), (name, fixes)
        x = inputs(1)
        with torch.no_grad():
            torch.save((x, opt(x)), art / "io.pt")
        dirs.append(str(art))
    code = textwrap.dedent(f"""
        import torch, rewriter
        for d in {dirs!r}:
            m = rewriter.load(d)
            x, ref = torch.load(d + "/io.pt")
            with torch.no_grad():
                print("CASE", d.rsplit("/", 1)[1], rewriter.relative_l2(ref, m(x)))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = {r[1]: float(r[2]) for r in (line.split() for line in res.stdout.splitlines()) if r and r[0] == "CASE"}
    assert sorted(rows) == sorted(PLANS)
    for name, err in rows.items():
        assert err < 1e-6, (name, err)


@pytest.fixture(scope="module")
def delta_plan():
    opt = rewriter.optimize(_lm(), _ids(0), variants={"block_sparse": {"keep": 0.5, "block": 16, "delta": 4}},
                            budget=None, dynamic=False)
    assert all(d.variant == "block_sparse" for d in opt.plan.decisions)
    return opt


def test_a_kernel_that_cannot_be_generated_is_recorded_and_the_artifact_still_loads(delta_plan, tmp_path, monkeypatch):
    import codegen.triton.launch as launch

    def unsupported(*a, **k):
        raise ValueError("no Triton kernel for this spec")

    monkeypatch.setattr(launch, "spec_from_fields", unsupported)
    art = rewriter.export(delta_plan, tmp_path / "art")
    meta = json.loads((art / "plan.json").read_text())
    assert sorted(meta["kernel_failures"]) == ["0", "1"] and "PyTorch path" in meta["kernel_failures"]["0"]
    assert all("_cpu_" not in n or n.endswith(".cpp") for n in meta["kernels"])
    x = _ids(2)
    with torch.no_grad():
        assert torch.equal(rewriter.load(art)(x), delta_plan(x))
    assert "no kernel source" in rewriter.artifact.describe(art)


def test_a_program_that_cannot_be_written_keeps_the_plan_and_says_so(delta_plan, tmp_path, monkeypatch):
    def full_disk(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.export, "save", full_disk)
    with pytest.raises(ExportError) as info:
        rewriter.export(delta_plan, tmp_path / "art")
    msg = str(info.value)
    assert "model.pt2" in msg and "No space left" in msg and "art.incomplete" in msg, msg
    assert not (tmp_path / "art").exists()
    kept = json.loads((tmp_path / "art.incomplete" / "plan.json").read_text())
    assert [d["variant"] for d in kept["plan"]["decisions"]] == ["block_sparse"] * 2
