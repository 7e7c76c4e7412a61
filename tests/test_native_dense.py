"""Exact dense sites lowered to the library's SDPA on the CPU (the default users get) and the bound-weights runner.

The rest of the suite keeps the ``rewriter::attention`` op in the graph (see conftest.py); here the
lowering is on, and every spelling, a stream of generated programs and Hugging Face models must give
what the op path and the original model give, through ``optimize`` and through the backend.
"""
from __future__ import annotations

import pytest
import torch

import rewriter
from passes.lower import lower_dense, why_not
from rewriter.runner import flat_runner
from tests.fuzz_programs import generate
from tests.spellings import CASES

OP = "rewriter.attention"
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.setenv("REWRITER_NATIVE_DENSE", "1")


def _fresh(inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t)
        if isinstance(t, torch.Tensor) else t for t in inputs)


def _count(gm, what) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and (
        OP in str(n.target) if what == "op" else n.target is SDPA))


@pytest.mark.parametrize("case", [c for c in CASES if c.expect], ids=lambda c: c.name)
def test_every_spelling_lowers_exactly(case):
    model, inputs = case.build()
    model.eval()
    opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
    # every plain site is an SDPA call now; what SDPA cannot express keeps the op
    assert _count(opt.program.graph_module, "op") + _count(opt.program.graph_module, "sdpa") >= len(case.expect)
    fresh = _fresh(inputs)
    with torch.no_grad():
        ref, out = model(*fresh), opt(*fresh)
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_most_spellings_do_lower():
    lowered = 0
    for case in (c for c in CASES if c.expect):
        model, inputs = case.build()
        opt = rewriter.optimize(model.eval(), inputs, variants=["dense"], budget=None)
        lowered += _count(opt.program.graph_module, "op") == 0
    assert lowered >= len([c for c in CASES if c.expect]) - 2, lowered


@pytest.mark.parametrize("seed", range(0, 120, 3))
def test_generated_programs_lower_exactly(seed):
    """Soft-caps, finite fills, causal with a mask: whatever keeps the op keeps it, the rest is SDPA."""
    model, inputs = generate(seed).build()
    try:
        opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
    except rewriter.CaptureError:
        pytest.skip("the program does not export")
    gm = opt.program.graph_module
    for n in gm.graph.nodes:
        if n.op == "call_function" and OP in str(n.target) and n.args[6] == "dense":
            assert why_not(n), f"{n.name} could have been lowered"
    fresh = _fresh(inputs, seed + 1)
    with torch.no_grad():
        ref, out = model(*fresh), opt(*fresh)
    tol = 1e-4 if any(isinstance(t, torch.Tensor) and t.dtype == torch.float16 for t in inputs) else 1e-5
    assert rewriter.relative_l2(ref, out) < tol


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("matmul_div", "sdpa_bool_padding", "repeat_kv_gqa",
                                                                   "cross", "where_tril_causal")], ids=lambda c: c.name)
def test_backend_lowers_exactly(case):
    torch._dynamo.reset()
    model, inputs = case.build()
    model.eval()
    compiled = torch.compile(model, backend="rewriter")
    fresh = _fresh(inputs, 3)
    with torch.no_grad():
        ref, out = model(*fresh), compiled(*fresh)
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_lowering_can_be_turned_off(monkeypatch):
    case = next(c for c in CASES if c.name == "matmul_div")
    model, inputs = case.build()
    opt = rewriter.optimize(model.eval(), inputs, variants=["dense"], budget=None)
    assert _count(opt.program.graph_module, "op") == 0 and _count(opt.program.graph_module, "sdpa") == 1
    monkeypatch.setenv("REWRITER_NATIVE_DENSE", "0")
    opt = rewriter.optimize(model.eval(), inputs, variants=["dense"], budget=None)
    assert _count(opt.program.graph_module, "op") == 1
    assert lower_dense(opt.program.graph_module) == 0


def test_approximate_sites_keep_the_op():
    case = next(c for c in CASES if c.name == "where_tril_causal")
    model, inputs = case.build()
    opt = rewriter.optimize(model.eval(), inputs, variants={"sliding_window": {"window": 4}}, budget=None)
    assert [d.variant for d in opt.plan.decisions] == ["sliding_window"], str(opt.plan)
    assert _count(opt.program.graph_module, "op") == 1


def test_lowered_artifact_loads_and_matches(tmp_path):
    case = next(c for c in CASES if c.name == "sdpa_bool_padding")
    model, inputs = case.build()
    opt = rewriter.optimize(model.eval(), inputs, variants=["dense"], budget=None)
    path = tmp_path / "artifact"
    rewriter.export(opt, path)
    loaded = rewriter.load(path)
    fresh = _fresh(inputs, 5)
    with torch.no_grad():
        assert rewriter.relative_l2(model(*fresh), loaded(*fresh)) < 1e-5


def test_hf_models_lower_exactly():
    from tests.hf_fixtures import build_bert, build_gpt2

    for build in (build_bert, build_gpt2):
        for impl in ("eager", "sdpa"):
            model, kw = build(impl)
            opt = rewriter.optimize(model, kw, variants=["dense"], budget=None)
            assert _count(opt.program.graph_module, "sdpa") >= 2
            with torch.no_grad():
                ref = model(**kw)
                out = opt(**kw)
            ref = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref[0]
            out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            assert rewriter.relative_l2(ref, out) < 1e-5, (build.__name__, impl)


class _WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("shift", torch.randn(8))
        self.register_buffer("table", torch.randn(8), persistent=False)

    def forward(self, x, *, scale=None):
        y = self.lin(x) + self.shift + self.table
        return {"y": y * (scale if scale is not None else 1.0), "pair": (y.sum(-1), x)}


def test_runner_matches_the_exported_module():
    m = _WithBuffers().eval()
    x, s = torch.randn(3, 8), torch.randn(3, 8)
    ep = torch.export.export(m, (), {"x": x, "scale": s})
    run = flat_runner(ep)
    assert run is not None
    x2, s2 = torch.randn(3, 8), torch.randn(3, 8)
    got, want = run(x=x2, scale=s2), ep.module()(x=x2, scale=s2)
    torch.testing.assert_close(got["y"], want["y"])
    torch.testing.assert_close(got["pair"][0], want["pair"][0])
    with pytest.raises(TypeError):
        run(x=x2)


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x):
        self.seen.add_(x)
        return x * 2 + self.seen


def test_runner_keeps_buffer_mutations_as_the_module_does():
    xs = [torch.randn(2) for _ in range(3)]
    ep_a, ep_b = (torch.export.export(_Counter(), (), {"x": xs[0]}) for _ in range(2))
    run, mod = flat_runner(ep_a), ep_b.module()
    assert run is not None or any(o.kind.name != "USER_OUTPUT" for o in ep_a.graph_signature.output_specs)
    for x in xs:
        torch.testing.assert_close((run or ep_a.module())(x=x), mod(x=x))
