"""Per-head plans: each head its own pattern (dense, window, or sinks + window), in one kernel call."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import codegen
from codegen import cpu_blocked, cpu_kernel
from codegen.naive import naive_attention
from codegen.variants import per_head as ph
from passes import pricing
from passes.variants import per_head as plan_ph

NAME = ph.NAME


def _loop_visible(specs, p, m, causal):
    """Each head's element mask written out: key j visible to query i (at M - P + i) by the head's rule."""
    vis = torch.zeros(1, len(specs), p, m, dtype=torch.bool)
    for h, (sinks, window) in enumerate(specs):
        for i in range(p):
            pos = m - p + i
            for j in range(m):
                ok = window == 0 or j < sinks or abs(pos - j) < window
                vis[0, h, i, j] = ok and (not causal or j <= pos)
    return vis


MIXES = [  # (window per head, sinks per head)
    ([0, 7, 3, 12], [0, 2, 0, 1]),
    ([1, 0, 0, 5], [0, 0, 0, 3]),
    ([16, 16, 2, 9], [4, 0, 4, 0]),
]
SHAPES = [(2, 4, 2, 37, 37, 8, 8), (1, 4, 4, 1, 45, 12, 12), (2, 4, 1, 21, 50, 8, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mix", MIXES, ids=str)
@pytest.mark.parametrize("masked", [True, False], ids=["padded", "no-mask"])  # no mask: dense heads via SDPA
def test_every_lowering_matches_the_loop_reference(mix, causal, shape, masked):
    b, h, g, p, m, e, f = shape
    window, sinks = mix
    torch.manual_seed(p * 7 + m)
    q, k, v = torch.randn(b, h, p, e), torch.randn(b, g, m, e), torch.randn(b, g, m, f)
    mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
    mask[-1, ..., m - m // 4:] = False  # padding on the last row
    if not masked:
        mask = None
    specs = ph.head_specs(window, sinks, h)
    want = naive_attention(q, k, v, mask, 0.3, visible=_loop_visible(specs, p, m, causal))
    torch.testing.assert_close(ph.reference(q, k, v, mask, 0.3, causal, window=window, sinks=sinks).double(),
                               want.double(), rtol=1e-5, atol=1e-5)
    for block in (16, 32):
        bm, lo, hi = ph.head_pattern(specs, p, m, causal, block)
        outs = {"blocked": cpu_blocked.blocked_attention(q, k, v, mask, 0.3, 0.0, bm, lo, hi)}
        if cpu_kernel.load() is not None:
            outs["compiled"] = cpu_kernel.try_run(q, k, v, mask, 0.3, 0.0, bm, lo, hi)
        outs["op"] = codegen.run(NAME, q, k, v, mask, 0.3, causal, window=window, sinks=sinks, block=block)
        for how, out in outs.items():
            torch.testing.assert_close(out[..., :f].double(), want.double(), rtol=1e-5, atol=1e-5,
                                       msg=lambda s, how=how: f"{how} block {block}: {s}")


def test_a_decode_step_keeps_each_heads_pattern():
    """The newest query alone against the whole cache sees what it saw as the last row of the prefill."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    prm = {"window": [0, 6, 3, 17], "sinks": [0, 2, 4, 0], "block": 16}
    full = codegen.run(NAME, q, k, v, None, 0.3, True, **prm)
    step = codegen.run(NAME, q[:, :, -1:], k, v, None, 0.3, True, **prm)
    torch.testing.assert_close(step, full[:, :, -1:], rtol=1e-5, atol=1e-5)
    # and the heads do differ: one pattern for every head would give another answer
    same = codegen.run(NAME, q[:, :, -1:], k, v, None, 0.3, True, window=[6], sinks=[2], block=16)
    assert not torch.allclose(step, same, atol=1e-3)


def test_dense_heads_and_covering_windows_are_dense_attention():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 29, 8), torch.randn(2, 2, 29, 8), torch.randn(2, 2, 29, 8)
    dense = naive_attention(q, k, v, None, 0.3, visible=torch.ones(29, 29, dtype=torch.bool).tril())
    for window in ([0], [0, 29, 0, 40]):
        out = codegen.run(NAME, q, k, v, None, 0.3, True, window=window)
        torch.testing.assert_close(out.double(), dense.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, sinks, name", [([0, 4, 8], None, "window"), ([4] * 4, [1, 2], "sinks"),
                                                 ([4] * 5, [0] * 5, "window")])
def test_a_list_not_one_per_head_is_refused_naming_the_parameter(window, sinks, name):
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=f"{name} has {len(window if name == 'window' else sinks)} entries for "
                                         "4 heads"):
        codegen.run(NAME, q, q, q, None, 0.3, True, window=window, sinks=sinks)
    site = SimpleNamespace(num_heads=4)
    assert name in plan_ph.fits(site, {"window": window, "sinks": sinks})


def test_a_forced_list_of_the_wrong_length_is_a_clear_error_before_any_work():
    import rewriter
    from rewriter import lm

    model = lm.TinyLM(lm.LMConfig(context=512, dim=32, layers=1, heads=4))
    ids = torch.randint(0, 256, (1, 300))
    with pytest.raises(ValueError, match="window has 3 entries for 4 heads"):
        rewriter.optimize(model, ids, variants={NAME: {"window": [0, 8, 8]}}, budget=None)
    short = rewriter.optimize(model, ids[:, :100], variants={NAME: {"window": [0, 8, 16, 4]}}, budget=None)
    assert short.plan.decisions[0].variant != NAME and "256 keys" in str(short.plan), str(short.plan)
    opt = rewriter.optimize(model, ids, variants={NAME: {"window": [0, 8, 16, 4], "sinks": [0, 2, 2, 0]}},
                            budget=None)
    with torch.no_grad():
        assert [d.variant for d in opt.plan.decisions] == [NAME]
        assert opt(ids).shape == model(ids).shape


def test_head_errors_are_each_heads_relative_l2():
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 4, 33, 8), torch.randn(2, 4, 33, 8), torch.randn(2, 4, 33, 8)
    out = codegen.run(NAME, q, k, v, None, 0.3, True, window=[0])
    rows = torch.ones(2, 33, dtype=torch.bool)
    rows[1, :5] = False
    rec = SimpleNamespace(q=q, k=k, v=v, mask=None, out=out, scale=0.3, causal=True, softcap=0.0, fill=None,
                          rows=rows)
    prm = {"window": [3, 0, 9, 1], "sinks": [0, 0, 2, 0], "block": 16}
    got = plan_ph.head_errors([rec, rec], prm)
    approx = codegen.run(NAME, q, k, v, None, 0.3, True, **prm)
    for h in range(4):
        d, r = (approx - out)[:, h][rows], out[:, h][rows]
        assert math.isclose(float(got[h]), float(d.norm() / r.norm()), rel_tol=1e-6), h
    assert float(got[1]) < 1e-6 and float(got[0]) > float(got[2]) > 1e-3


def _records(seed: int, n: int = 256):
    """Heads of different reach: heads 0-1 attend to the last few tokens, heads 2-3 evenly to every key."""
    g = torch.Generator().manual_seed(seed)
    e, step = 16, 0.1
    c = 1.0 / (step * step * (e - 1))  # score falls by about one per token of distance
    scale = e ** -0.5
    recs = []
    for _ in range(2):
        x = torch.cumsum(torch.randn(n, e - 1, generator=g) * step, 0)  # a random walk: near in time, near here
        # q.k = c (2 x_i.x_j - |x_j|^2) = c (|x_i|^2 - |x_i - x_j|^2): a softmax over j sees -c |x_i - x_j|^2
        local_q = torch.cat([2 * c * x, torch.full((n, 1), -c)], 1) / scale
        local_k = torch.cat([x, x.pow(2).sum(1, keepdim=True)], 1)
        q = torch.zeros(1, 4, n, e)
        k = torch.randn(1, 4, n, e, generator=g)
        q[0, :2], k[0, :2] = local_q, local_k
        v = torch.randn(1, 4, n, e, generator=g)
        out = codegen.run(NAME, q, k, v, None, scale, True, window=[0])
        recs.append(SimpleNamespace(q=q, k=k, v=v, mask=None, out=out, scale=scale, causal=True, softcap=0.0,
                                    fill=None, rows=None))
    return recs


SITE = SimpleNamespace(num_heads=4, num_kv_heads=4, q_len=256, kv_len=256, head_dim=16, v_head_dim=16, batch=1,
                       causal=True, is_cross=False, softcap=0.0, mask_kind="causal", fill=None, window=None,
                       spelling="sdpa", score_ops=0, name="s", index=0)


def test_fitting_gives_each_head_the_narrowest_window_under_the_level():
    recs = _records(0)
    mixes = plan_ph.fit(SITE, recs)
    assert mixes, "no mix: the heads' different reach was not seen"
    for mix in mixes:
        assert len(mix["window"]) == 4 and len(set(mix["window"])) > 1
    sizes = plan_ph.windows(SITE.kv_len)
    errs = {w: plan_ph.head_errors(recs, {"window": [w], "sinks": [plan_ph.SINKS]}) for w in sizes}
    want = []  # the rule at each level: the narrowest window under it, else dense
    for lvl in plan_ph.LEVELS:
        pick = [min([w for w in sizes if float(errs[w][h]) <= lvl], default=0) for h in range(4)]
        if len(set(pick)) > 1 and pick not in want:
            want.append(pick)
    assert [mix["window"] for mix in mixes] == want
    local = [mix["window"][:2] for mix in mixes]
    far = [mix["window"][2:] for mix in mixes]
    assert any(a and a <= 32 for pair in local for a in pair), local  # the local heads get narrow windows
    assert all(w == 0 or w > 32 for pair in far for w in pair), far  # the far-looking ones stay wide or dense


def test_planning_without_records_refuses_with_its_reason_and_fits_with_them():
    cands = [SimpleNamespace(variant=NAME, params=p, exact=False) for p in plan_ph.grid(SITE)]
    sp = SimpleNamespace(site=SITE, options=list(cands), refusals=[])
    plan_ph.prepare(sp, cands, [], 0, lambda *_: None)
    assert not sp.options and any("calibration records" in r for r in sp.refusals)
    cands = [SimpleNamespace(variant=NAME, params=p, exact=False) for p in plan_ph.grid(SITE)]
    sp = SimpleNamespace(site=SITE, options=list(cands), refusals=[])
    plan_ph.prepare(sp, cands, _records(1), 0, lambda *_: None)
    assert sp.options and all("window" in c.params and "level" not in c.params for c in sp.options)


def test_a_mixed_site_is_priced_between_its_extremes():
    hw = pricing.profile("cpu", "")
    site = SimpleNamespace(**{**vars(SITE), "q_len": 2048, "kv_len": 2048, "head_dim": 64, "v_head_dim": 64})
    dense = pricing.seconds(site, "dense", {}, hw)
    narrow = pricing.seconds(site, NAME, {"window": [64], "sinks": [4]}, hw)
    mix = pricing.seconds(site, NAME, {"window": [0, 64, 64, 64], "sinks": [0, 4, 4, 4]}, hw)
    half = pricing.seconds(site, NAME, {"window": [0, 0, 64, 64], "sinks": [0, 0, 4, 4]}, hw)
    assert narrow < mix < half < dense, (narrow, mix, half, dense)
    # one call's parts add up: three quarters of the heads windowed, one quarter dense
    assert math.isclose(mix, 0.75 * narrow + 0.25 * dense, rel_tol=0.15), (mix, narrow, dense)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gpt", "rope"])
def test_per_head_plans_against_the_best_per_site_plan_on_the_projects_lms(which):
    """Issue 16's "per-head pays": both plans at KL 0.01, their measured forward times printed side by side.

    The per-head plan must use per-head patterns, keep the budget on held-out rows and not run slower than
    the per-site plan beyond this VM's noise (10%); the figures themselves are what the README reports.
    """
    import statistics
    import time

    import rewriter
    from passes.variants import VARIANTS
    from rewriter import lm, rope_lm

    if not (lm.CHECKPOINT if which == "gpt" else rope_lm.CHECKPOINT).exists():
        pytest.skip("no trained checkpoint")
    model = lm.load() if which == "gpt" else rope_lm.load()
    calib = lm.windows(lm.corpus("train"), model.cfg.context, 4, seed=3)[:, :-1]
    names = list(VARIANTS)
    plans = {}
    with torch.no_grad():
        for label, allowed in (("per-head", names), ("per-site", [n for n in names if n != NAME])):
            plans[label] = rewriter.optimize(model, calib, budget=0.01, metric="kl", variants=allowed)
        x = calib[:1]
        times: dict = {k: [] for k in plans}
        for o in plans.values():
            o(x)
        for _ in range(9):  # interleaved, medians
            for k, o in plans.items():
                t = time.perf_counter()
                o(x)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{which} LM, {model.cfg.context} bytes, KL 0.01: per-head plan {1e3 * med['per-head']:.1f} ms, "
          f"best per-site plan {1e3 * med['per-site']:.1f} ms (medians of 9 interleaved forwards)")
    chosen = [d.variant for d in plans["per-head"].plan.decisions]
    assert NAME in chosen, str(plans["per-head"].plan)
    for o in plans.values():
        assert o.plan.holdout_error is not None and o.plan.holdout_error <= 0.01
    assert med["per-head"] <= 1.10 * med["per-site"]
