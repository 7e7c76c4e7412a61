"""Issue 14 regressions: attention as third-party libraries write it, through every entry point.

Each class is a model written the way a library writes it (tests/library_models.py). Each must be found
from its dataflow, rewritten exactly (dense within 1e-5 relative L2 on fresh inputs) through
``rewriter.optimize``, ``torch.compile(backend="rewriter")`` and an export loaded in a fresh process.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import rewriter
import rewriter.backend as backend
from tests import library_models as L


@dataclass(frozen=True)
class Case:
    """A library-style model, its inputs, how many sites it has and what each must say about itself."""

    build: Callable
    inputs: Callable[[int], tuple]
    sites: int
    flags: dict
    backend_config: tuple = ()  # dynamo settings the model needs to be traced whole


def _x(seed: int, *extra) -> tuple:
    torch.manual_seed(seed)
    return (L.x_(),) + tuple(f() for f in extra)


def _keep(seed: int) -> tuple:
    torch.manual_seed(seed)
    return L.x_(), L.keep_(pad=2 + seed % 3)


def _text(seed: int) -> tuple:
    torch.manual_seed(seed)
    return L.x_(), torch.randn(L.B, L.T, L.E), L.text_mask_(pad=1 + seed % 4)


def _pixels(seed: int) -> tuple:
    torch.manual_seed(seed)
    return (L.pixels_(),)


CASES = {
    "dead_clones": Case(L.DeadClones, _x, 1, dict(causal=True, mask_kind="causal", head_dim=L.D, kv_len=L.N)),
    "inplace_dropout": Case(L.InplaceDropout, _keep, 1, dict(mask_kind="padding", head_dim=L.D)),
    "transposed_values": Case(L.TransposedValues, _x, 1, dict(mask_kind="none", v_head_dim=L.D)),
    "keys_first": Case(L.KeysFirst, _x, 1, dict(mask_kind="none", q_len=L.N, kv_len=L.N, is_cross=False)),
    "per_head_logit_scale": Case(L.CosineAttention, _x, 1, dict(mask_kind="additive", has_bias=True)),
    "inplace_bias_write": Case(L.SliceBiasWrite, _keep, 1, dict(mask_kind="additive", has_bias=True)),
    "indexed_mask_write": Case(L.IndexedMaskWrite, _keep, 1, dict(has_bias=False)),
    "per_sample_text": Case(L.PerSampleText, _text, L.B, dict(is_cross=True, q_len=L.N, kv_len=-1, batch=1),
                            backend_config=(("capture_scalar_outputs", True),)),
    "per_sample_self": Case(L.PerSampleSelf, _keep, L.B, dict(q_len=-1, kv_len=-1, batch=1, mask_kind="none"),
                            backend_config=(("capture_scalar_outputs", True),)),
    "register_vit": Case(L.RegisterViT, _pixels, 2, dict(q_len=1 + 3 + 25, mask_kind="none")),
    "dynamic_size_vit": Case(L.DynamicSizeViT, _pixels, 2, dict(q_len=1 + 25)),
    "resampled_patch_vit": Case(L.ResampledPatchViT, _pixels, 2, dict(q_len=1 + 24)),
}


def _model(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return case.build().eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_found_and_rewritten_exactly_by_optimize(name):
    case = CASES[name]
    model, inputs = _model(case), case.inputs(0)
    sites = rewriter.find_attention(model, inputs)
    assert len(sites) == case.sites, [s.describe() for s in sites]
    for s in sites:
        assert s.rewritable, s.reason
        assert {f: getattr(s, f) for f in case.flags} == case.flags, s.describe()
    opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
    assert [d.variant for d in opt.plan.decisions] == ["dense"] * case.sites, str(opt.plan)
    fresh = case.inputs(1)
    with torch.no_grad():
        ref, out = model(*fresh), opt(*fresh)
    assert rewriter.relative_l2(ref, out) < 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_rewrites_exactly(name):
    case = CASES[name]
    model = _model(case)
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    fresh = case.inputs(2)
    with torch._dynamo.config.patch(dict(case.backend_config)), torch.no_grad():
        out = torch.compile(model, backend="rewriter")(*fresh)
        ref = model(*fresh)
    assert len(backend.LAST_SITES) == case.sites, [s.describe() for s in backend.LAST_SITES]
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_export_load_in_a_fresh_process(tmp_path):
    dirs = []
    for name, case in sorted(CASES.items()):
        model, inputs = _model(case), case.inputs(0)
        opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)
        art = tmp_path / name
        rewriter.export(opt, art)
        fresh = case.inputs(3)
        with torch.no_grad():
            torch.save((fresh, model(*fresh)), art / "io.pt")
        dirs.append(str(art))
    code = textwrap.dedent(f"""
        import torch, rewriter
        for d in {dirs!r}:
            m = rewriter.load(d)
            inputs, ref = torch.load(d + "/io.pt")
            with torch.no_grad():
                err = rewriter.relative_l2(ref, m(*inputs))
            print("CASE", d.rsplit("/", 1)[1], err, [x.variant for x in m.plan.decisions].count("dense"))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = {r[1]: (float(r[2]), int(r[3])) for r in (line.split() for line in res.stdout.splitlines())
            if r and r[0] == "CASE"}
    assert sorted(rows) == sorted(CASES)
    for name, (err, dense) in rows.items():
        assert err < 1e-5 and dense == CASES[name].sites, (name, err, dense)


def test_per_sample_lengths_without_scalar_capture_run_through_the_backend():
    """By default dynamo breaks the graph at .item(); the attention then runs eagerly, never wrongly."""
    model, fresh = _model(CASES["per_sample_self"]), _keep(4)
    torch._dynamo.reset()
    with torch.no_grad():
        assert rewriter.relative_l2(model(*fresh), torch.compile(model, backend="rewriter")(*fresh)) < 1e-5


@pytest.mark.parametrize("name,grid,prefix", [("register_vit", [5, 5], 4), ("dynamic_size_vit", [5, 5], 1),
                                               ("resampled_patch_vit", [6, 4], 1)])
def test_neighborhood_finds_the_image_grid(name, grid, prefix):
    from codegen.ops import recording
    from codegen.variants import neighborhood_2d as nb

    case = CASES[name]
    model = _model(case)
    opt = rewriter.optimize(model, case.inputs(0), variants={"neighborhood_2d": {"kernel": [3, 3]}}, budget=None)
    for d in opt.plan.decisions:
        assert d.variant == "neighborhood_2d", str(opt.plan)
        assert (d.params["grid"], d.params["prefix"]) == (grid, prefix), d.params
    with torch.no_grad(), recording() as calls:
        opt(*case.inputs(5))
    calls = [c for c in calls if c["variant"] == "neighborhood_2d"]
    assert len(calls) == case.sites
    for c in calls:
        ref = nb.reference(c["q"], c["k"], c["v"], c["mask"], c["scale"], c["causal"], grid=grid, kernel=[3, 3],
                           prefix=prefix)
        assert rewriter.relative_l2(ref, c["out"]) < 1e-5


def test_tokens_that_do_not_keep_grid_order_have_no_grid():
    """A permutation of the patch tokens (here: reversed) is no grid; the neighbourhood is refused with why."""

    class Shuffled(L.RegisterViT):
        def forward(self, pixels):
            x = self.patch(pixels).flatten(2).transpose(1, 2).flip(1)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            for blk in self.blocks:
                x = blk(x)
            return x

    torch.manual_seed(0)
    opt = rewriter.optimize(Shuffled().eval(), _pixels(0), variants={"neighborhood_2d": {"kernel": [3, 3]}},
                            budget=None)
    assert all(d.variant == "dense" and "no image grid" in d.reason for d in opt.plan.decisions), str(opt.plan)


def test_unexportable_model_names_the_backend_route_and_the_backend_serves_it():
    torch.manual_seed(0)
    model, x = L.Unexportable().eval(), L.x_()
    with pytest.raises(rewriter.CaptureError) as info:
        rewriter.optimize(model, (x,))
    msg = str(info.value)
    assert "\n" not in msg and 'backend="rewriter"' in msg and "Unexportable" in msg, msg
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    fresh = torch.randn(3, 11, L.E)
    with torch.no_grad():
        out = torch.compile(model, backend="rewriter")(fresh)
        assert rewriter.relative_l2(model(fresh), out) < 1e-5
    assert len(backend.LAST_SITES) == 1


class _ReturnsScores(L._QKV):
    """A causal layer that hands its masked scores back to the caller: a real outside use."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        raw = (q @ k.transpose(-2, -1)) * L.D ** -0.5  # returned below: an intermediate of the scores
        s = raw.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return self.o(L._merge(s.softmax(-1) @ v)), raw


def test_a_refused_site_describes_what_is_known():
    (site,) = rewriter.find_attention(_ReturnsScores().eval(), (L.x_(),))
    assert not site.rewritable and "used outside the attention" in site.reason
    text = site.describe()
    assert "causal" in text and "bidirectional" not in text and f"d={L.D}" in text and f"kv={L.N}" in text, text


def test_what_a_refused_site_does_not_know_reads_unknown():
    from passes.capture import capture, graph_context
    from passes.refused import refused_site

    ep, _ = capture(L.TransposedValues().eval(), (L.x_(),))
    ctx = graph_context(ep)
    sm = next(n for n in ep.graph.nodes if "softmax" in n.name)
    site = refused_site(ctx, sm, 0, "because", {})
    assert site.causal is None and site.head_dim == -1 and site.mask_kind == "unknown"
    assert "causal=unknown" in site.describe() and "d=unknown" in site.describe()


def test_writes_into_scores_in_a_graph_that_is_not_functional_are_refused():
    """A graph captured without functionalising (torch.export directly) hides a slice write from the
    dataflow; the finder must refuse the site, never rewrite it without the bias."""
    from passes.capture import graph_context
    from passes.find import find_matches

    torch.manual_seed(0)
    model = L.SliceBiasWrite().eval()
    with torch.no_grad():
        ep = torch.export.export(model, (L.x_(), L.keep_()), strict=False)
    matches, _ = find_matches(graph_context(ep))
    assert matches and all(not m.site.rewritable for m in matches), [m.site.describe() for m in matches]
    assert all("in place" in m.site.reason for m in matches)


def test_backend_compiles_the_graph_unchanged_when_inductor_rejects_the_rewrite(monkeypatch):
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx_inner

    def picky(gm, *args, **kwargs):
        if any("rewriter.attention" in str(n.target) for n in gm.graph.nodes):
            raise RuntimeError("cannot lower this")
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx_inner", picky)
    model, fresh = _model(CASES["inplace_bias_write"]), _keep(6)
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    with torch.no_grad():
        out = torch.compile(model, backend="rewriter")(*fresh)
        assert rewriter.relative_l2(model(*fresh), out) < 1e-6
    assert backend.LAST_SITES == []


def test_optimize_leaves_the_model_unchanged_when_planning_fails(monkeypatch):
    import passes.choose as choose

    def broken(*a, **k):
        raise KeyError("a planner bug")

    monkeypatch.setattr(choose, "search", broken)
    model, inputs = _model(CASES["dead_clones"]), _x(0)
    opt = rewriter.optimize(model, inputs)
    (d,) = opt.plan.decisions
    assert d.variant == "original" and "planning failed (KeyError" in d.reason
    fresh = _x(7)
    with torch.no_grad():
        assert rewriter.relative_l2(model(*fresh), opt(*fresh)) < 1e-6
