"""One optimized model and one exported artifact serve every length. A forced variant (no accuracy gate) runs at
every length, so the outputs mean the same at each; a planned one is dense below its crossover and beyond its
calibrated length (tests/test_every_length.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import rewriter
from codegen.ops import recording
from codegen.variants import sliding_window as sw
from rewriter import lm

CFG = lm.LMConfig(context=512, dim=64, layers=2, heads=2)
FORCED = {"sliding_window": {"window": 64}}


def _model() -> lm.TinyLM:
    torch.manual_seed(0)
    return lm.TinyLM(CFG).eval()


def _calls(opt, ids):
    with torch.no_grad(), recording() as calls:
        out = opt(ids)
    return out, calls


def _check(model, opt, short, long):
    out, calls = _calls(opt, short)
    assert {c["variant"] for c in calls} == {"sliding_window"}, {c["variant"] for c in calls}
    with torch.no_grad():  # shorter than the window: the same as causal dense
        assert rewriter.relative_l2(model(short), out) < 1e-5
    out, calls = _calls(opt, long)
    inner = [c for c in calls if c["variant"] == "sliding_window"]
    assert len(inner) == CFG.layers
    for c in inner:  # each long call is the windowed kernel, equal to the variant's naive reference
        ref = sw.reference(c["q"], c["k"], c["v"], c["mask"], c["scale"], c["causal"], window=64)
        assert rewriter.relative_l2(ref, c["out"]) < 1e-5
    with torch.no_grad():
        assert rewriter.relative_l2(model(long), out) > 1e-4  # the window really changed the result


def test_one_model_serves_every_length():
    model = _model()
    ids = torch.randint(0, 256, (1, 512))
    opt = rewriter.optimize(model, ids, variants=FORCED, budget=None)
    assert opt.lengths is not None and opt.lengths.high == 512, str(opt.plan)
    assert "one program serves sequence lengths" in str(opt.plan)
    short, long = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 500))
    _check(model, opt, short, long)
    assert opt._by_shape == {}  # served without re-capturing


def test_one_artifact_serves_every_length_in_a_fresh_process(tmp_path):
    model = _model()
    opt = rewriter.optimize(model, torch.randint(0, 256, (1, 512)), variants=FORCED, budget=None)
    rewriter.export(opt, tmp_path / "art")
    torch.manual_seed(1)
    short, long = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 500))
    torch.save({"short": short, "long": long}, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import json, torch, rewriter
        from codegen.ops import recording
        m = rewriter.load({str(tmp_path / 'art')!r})
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        res = {{}}
        for name, x in ids.items():
            with torch.no_grad(), recording() as calls:
                out = m(x)
            torch.save(out, {str(tmp_path)!r} + f"/out_{{name}}.pt")
            res[name] = sorted({{c["variant"] for c in calls}})
        print(json.dumps(res))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"short": ["sliding_window"], "long": ["sliding_window"]}, res
    for name, x in (("short", short), ("long", long)):
        with torch.no_grad():
            assert rewriter.relative_l2(opt(x), torch.load(tmp_path / f"out_{name}.pt")) < 1e-6


def test_heads_first_inputs_are_not_taken_for_a_sequence():
    """An input laid out [B, H, N, D] has no sequence in dim 1: no dynamic program over the heads dimension;
    the causal mask the model builds from N is still recognised and dropped (the kernel applies it)."""

    class HeadsFirst(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = x.chunk(3, dim=-1)
            n = x.shape[-2]
            s = (q @ k.transpose(-1, -2)) / 4.0
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            return s.softmax(-1) @ v

    x = torch.randn(1, 3, 40, 48)
    opt = rewriter.optimize(HeadsFirst(), (x,), variants={"sliding_window": {"window": 8}}, budget=None)
    assert not any("one program serves" in n for n in opt.plan.notes), opt.plan.notes
    out, calls = _calls(opt, x)
    assert [(c["variant"], c["causal"], c["mask"]) for c in calls] == [("sliding_window", True, None)]
    q, k, v = x.chunk(3, dim=-1)
    assert rewriter.relative_l2(sw.reference(q, k, v, None, 0.25, True, window=8), out) < 1e-5
