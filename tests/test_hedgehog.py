"""Learned (Hedgehog) feature maps: fitted on calibration data they beat a fixed map, and they travel in artifacts."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
from passes.calibrate import record_sites, site_error
from passes.capture import analyse
from passes.fitting import fit_hedgehog
from passes.measure import op_nodes
from passes.rewrite import rewrite_graph
from rewriter import lm

pytestmark = pytest.mark.skipif(not lm.CHECKPOINT.exists(), reason="the trained checkpoint is not in this checkout")


def _records(n: int = 256):
    model = lm.load()
    ids = lm.windows(lm.corpus("train"), n - 1, 3, seed=5)[:, :n]
    ep, spec, matches, _ = analyse(model, ids)
    rewrite_graph(ep.graph_module, [(m, "dense", {}) for m in matches])
    kw = spec.bind((ids,), {})
    return model, ids, record_sites(ep, [kw], op_nodes(ep.graph_module.graph))


def test_fitted_map_beats_elu_at_the_same_window():
    _, _, recs = _records()
    for site in (0, 2):
        fitted = fit_hedgehog(recs[site], steps=60, progress=False)
        params = {"window": 0, "chunk": 64}
        learned = site_error(recs[site], "linear", {"feature_map": "hedgehog", **params}, extra=fitted)
        fixed = site_error(recs[site], "linear", {"feature_map": "elu1", **params})
        assert learned < 0.9 * fixed, (site, learned, fixed)


def test_learned_maps_travel_in_the_artifact(tmp_path):
    torch.manual_seed(0)
    model = lm.TinyLM(lm.LMConfig(context=128, dim=32, layers=2, heads=2)).eval()  # small: fitting is quick
    ids = torch.randint(0, 256, (2, 128))
    opt = rewriter.optimize(model, ids, variants={"linear": {"feature_map": "hedgehog"}}, budget=None,
                            dynamic=False)
    assert all(d.params.get("feature_map") == "hedgehog" for d in opt.plan.decisions), str(opt.plan)
    rewriter.export(opt, tmp_path / "art")
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(opt(ids), tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, rewriter
        m = rewriter.load({str(tmp_path / 'art')!r})
        with torch.no_grad():
            out = m(torch.load({str(tmp_path / 'ids.pt')!r}))
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        print(rewriter.relative_l2(ref, out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-6
