"""Hugging Face families with score modifiers: Gemma-2 (soft-cap, local/global), Mistral (sliding
window), Bloom (ALiBi through baddbmm) found with their flags and rewritten exactly by every entry point."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
import rewriter.backend as backend

pytest.importorskip("transformers")
from tests.hf_modifier_fixtures import FAMILIES, build  # noqa: E402

CASES = [("gemma2", "eager"), ("mistral", "eager"), ("mistral", "sdpa"), ("bloom", "eager")]
IDS = [f"{f}-{i}" for f, i in CASES]


def _expected(family: str, sites) -> None:
    assert len(sites) == 2 and all(s.rewritable and s.causal for s in sites), [s.describe() for s in sites]
    if family == "gemma2":
        assert [s.window for s in sites] == [4, None] and all(s.softcap == pytest.approx(5.0) for s in sites)
    elif family == "mistral":
        assert [s.window for s in sites] == [4, 4]
    else:
        assert all(s.has_bias and s.mask_kind == "additive" for s in sites)


@pytest.mark.parametrize("family,impl", CASES, ids=IDS)
def test_optimize_is_exact(family, impl):
    model, inputs = build(family, impl, padded=True)
    _expected(family, rewriter.find_attention(model, inputs))
    opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
    assert [d.variant for d in opt.plan.decisions] == ["dense", "dense"], str(opt.plan)
    _, fresh = build(family, impl, input_seed=3, padded=True)
    with torch.no_grad():
        assert rewriter.relative_l2(model(**fresh, use_cache=False), opt(**fresh)) < 1e-5


@pytest.mark.parametrize("family,impl", CASES, ids=IDS)
def test_backend_is_exact(family, impl):
    model, inputs = build(family, impl)
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    compiled = torch.compile(model, backend="rewriter")
    _, fresh = build(family, impl, input_seed=1)
    with torch.no_grad():
        ref, out = model(**fresh, use_cache=False), compiled(**fresh, use_cache=False)
    assert len(backend.LAST_SITES) == 2, [s.describe() for s in backend.LAST_SITES]
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_export_load_in_fresh_process(tmp_path):
    dirs = []
    logging.disable(logging.WARNING)
    for family, impl in CASES:
        model, inputs = build(family, impl, padded=True)
        opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
        d = tmp_path / f"{family}-{impl}"
        rewriter.export(opt, d)
        _, fresh = build(family, impl, input_seed=2, padded=True)
        with torch.no_grad():
            torch.save((fresh, model(**fresh, use_cache=False)), d / "io.pt")
        dirs.append(str(d))
    logging.disable(logging.NOTSET)
    code = textwrap.dedent(f"""
        import torch, rewriter
        for d in {dirs!r}:
            m = rewriter.load(d)
            inputs, ref = torch.load(d + "/io.pt", weights_only=False)
            with torch.no_grad():
                print("CASE", d.rsplit("/", 1)[1], rewriter.relative_l2(ref, m(**inputs)),
                      sum(x.variant == "dense" for x in m.plan.decisions))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("CASE")]
    assert len(rows) == len(CASES)
    for _, name, err, n in rows:
        assert float(err) < 1e-5 and int(n) == 2, (name, err, n)


def test_families_listed():
    assert set(FAMILIES) == {f for f, _ in CASES}
