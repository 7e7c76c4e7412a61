"""Hugging Face families through the torch.compile backend and the export/load round trip."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
import rewriter.backend as backend

pytest.importorskip("transformers")
from tests.hf_fixtures import ATTN_IMPLEMENTATIONS, FAMILIES, build, make_inputs  # noqa: E402

PAIRS = [(f, i) for f in FAMILIES for i in ATTN_IMPLEMENTATIONS]


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, **({"use_cache": False} if "decoder_input_ids" in inputs or "input_features" in inputs
                                  else {}))


@pytest.mark.parametrize("family,impl", PAIRS, ids=[f"{f}-{i}" for f, i in PAIRS])
def test_backend(family, impl):
    model, inputs = build(family, impl)
    expected = len(rewriter.find_attention(model, inputs))
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    compiled = torch.compile(model, backend="rewriter")
    fresh = make_inputs(family, input_seed=1)
    with torch.no_grad():
        ref, out = model(**fresh), compiled(**fresh)
    assert len(backend.LAST_SITES) == expected, [s.describe() for s in backend.LAST_SITES]
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_export_load_all_families_in_fresh_process(tmp_path):
    cases = []
    for family, impl in PAIRS:
        model, inputs = build(family, impl)
        opt = rewriter.optimize(model, inputs, variants=["dense"])
        assert all(d.variant == "dense" for d in opt.plan.decisions), opt.plan
        d = tmp_path / f"{family}-{impl}"
        rewriter.export(opt, d)
        fresh = make_inputs(family, input_seed=2)
        with torch.no_grad():
            ref = model(**fresh, **opt.spec.injected)
        torch.save((fresh, ref), d / "io.pt")
        cases.append(str(d))
    code = textwrap.dedent(f"""
        import torch, rewriter
        for d in {cases!r}:
            m = rewriter.load(d)
            inputs, ref = torch.load(d + "/io.pt", weights_only=False)
            with torch.no_grad():
                err = rewriter.relative_l2(ref, m(**inputs))
            print("CASE", d.rsplit("/", 1)[1], err, len(m.plan.decisions))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("CASE")]
    assert len(rows) == len(PAIRS)
    for _, name, err, n in rows:
        assert float(err) < 1e-5, (name, err)
        assert int(n) > 0, name
