"""Budgets in the user's terms: the default metric follows what the model returns; perplexity; the site cap."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from passes import metrics
from rewriter import lm
from tests.builders import Causal


def _tiny_lm(seed: int = 0, n: int = 80) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = lm.TinyLM(lm.LMConfig(context=n, dim=32, layers=2, heads=2)).eval()
    return model, torch.randint(0, 256, (4, n), generator=torch.Generator().manual_seed(seed + 1))


class Pooled(nn.Module):
    """A bidirectional encoder that returns one mean-pooled vector per row (a sentence embedding)."""

    def __init__(self, d: int = 32, h: int = 4):
        super().__init__()
        self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, d)).mean(1)


class Encoder(nn.Module):
    """Bidirectional self-attention over a padded batch; returns per-token hidden states."""

    def __init__(self, d: int = 32, h: int = 4):
        super().__init__()
        self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, None, :].bool())
        return self.o(y.transpose(1, 2).reshape(b, n, d))


def _forced(model, inputs, **kw):
    return rewriter.optimize(model, inputs, budget=1.0, variants=["dense", "sliding_window"], dynamic=False, **kw)


def test_default_metric_is_kl_for_a_causal_lm_and_the_plan_says_why():
    model, ids = _tiny_lm()
    opt = _forced(model, ids)
    assert opt.plan.metric == "kl"
    assert "causal LM" in opt.plan.metric_reason and "input_ids" in opt.plan.metric_reason
    assert "metric: kl" in str(opt.plan)


def test_default_metric_is_cosine_for_pooled_embeddings():
    opt = _forced(Pooled().eval(), torch.randn(3, 40, 32))
    assert opt.plan.metric == "cosine", opt.plan.metric_reason
    assert "pooled" in opt.plan.metric_reason


def test_default_metric_is_l2_over_non_padded_positions_otherwise():
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[0, 30:] = 0
    opt = _forced(Encoder().eval(), {"x": torch.randn(3, 40, 32), "attention_mask": mask})
    assert opt.plan.metric == "l2" and "non-padded" in opt.plan.metric_reason


def test_causal_model_over_float_inputs_is_not_taken_for_an_lm():
    opt = _forced(Causal().eval(), torch.randn(2, 40, 32))
    assert opt.plan.metric == "l2"


def test_perplexity_metric_is_the_relative_rise_on_the_inputs_next_tokens():
    model, ids = _tiny_lm()
    other, _ = _tiny_lm(seed=3)
    with torch.no_grad():
        ref, out = model(ids), other(ids)
    choice = metrics.resolve("perplexity", {"input_ids": ids}, ref, causal=True)
    got = metrics.error(ref, out, choice, inputs={"input_ids": ids})
    # lm.perplexity runs ids[:, :-1] and scores ids[:, 1:]: the same next tokens (causal), in float32
    want = lm.perplexity(other, ids) / lm.perplexity(model, ids) - 1
    assert got == pytest.approx(want, rel=1e-4)
    # padded positions (a 0 in the mask) neither predict nor are predicted
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[:, -10:] = False
    cut = metrics.error(ref, out, choice, pad=pad, inputs={"input_ids": ids})
    short = ids[:, :-10]
    with torch.no_grad():
        direct = metrics.error(model(short), other(short), choice, inputs={"input_ids": short})
    assert cut == pytest.approx(direct, rel=1e-5)


def test_perplexity_budget_holds_on_the_calibration_rows_and_is_printed_in_percent():
    model, ids = _tiny_lm(n=96)
    opt = rewriter.optimize(model, ids, budget=0.02, metric="perplexity", dynamic=False,
                            variants=["dense", "sliding_window", "sinks_window", "linear"])
    assert opt.plan.metric == "perplexity"
    assert opt.plan.error is not None and opt.plan.error <= 0.02
    assert "perplexity change" in str(opt.plan) and "+2%" in str(opt.plan)


def test_perplexity_on_a_model_without_token_logits_fails_before_any_work(monkeypatch):
    import passes.pipeline as pipeline

    def no_capture(*a, **k):
        raise AssertionError("captured before the metric was checked")

    monkeypatch.setattr(pipeline, "analyse", no_capture)
    with pytest.raises(ValueError, match="perplexity.*token logits"):
        rewriter.optimize(Pooled().eval(), torch.randn(2, 16, 32), metric="perplexity", budget=0.02)


def test_perplexity_on_a_bidirectional_model_is_refused():
    model, ids = _tiny_lm()
    for blk in model.blocks:  # same logits shape, but every position sees the token it would predict
        blk.attn.forward = _bidirectional(blk.attn)
    with pytest.raises(ValueError, match="not causal"):
        rewriter.optimize(model, ids, metric="perplexity", budget=0.02, dynamic=False)


def _bidirectional(attn):
    def forward(x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, attn.heads, d // attn.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x)))
        return attn.o_proj(y.transpose(1, 2).reshape(b, n, d))
    return forward


def test_unknown_metric_lists_the_known_ones():
    model, ids = _tiny_lm()
    with pytest.raises(ValueError) as e:
        rewriter.optimize(model, ids, metric="bleu")
    for name in metrics.METRICS:
        assert repr(name) in str(e.value)


def test_bad_site_cap_is_refused():
    model, ids = _tiny_lm()
    with pytest.raises(ValueError, match="site_cap"):
        rewriter.optimize(model, ids, site_cap=0)


def test_site_cap_keeps_every_approximate_site_below_it():
    """A window whose site error is large passes a loose model budget only without the cap."""
    model, ids = _tiny_lm(n=1024)  # long enough that a window of 8 is priced cheaper than dense
    kw = dict(budget=10.0, metric="l2", variants={"dense": None, "sliding_window": {"window": 8}}, dynamic=False)
    free = rewriter.optimize(model, ids, site_cap=None, **kw)
    errs = [d.error for d in free.plan.decisions if d.variant == "sliding_window"]
    assert errs, str(free.plan)
    cap = min(errs) * 0.5
    capped = rewriter.optimize(model, ids, site_cap=cap, **kw)
    assert all(d.variant == "dense" for d in capped.plan.decisions), str(capped.plan)
    assert "site cap" in str(capped.plan) and "above the site cap" in str(capped.plan)
    assert capped.plan.site_cap == pytest.approx(cap)


def test_plan_round_trips_metric_fields():
    model, ids = _tiny_lm()
    plan = _forced(model, ids).plan
    back = type(plan).from_json(plan.to_json())
    assert (back.metric, back.metric_reason, back.site_cap) == (plan.metric, plan.metric_reason, plan.site_cap)
    assert not math.isnan(back.error)


def _site(seconds_and_errors, dense_s=1.0):
    from passes.planner import Candidate, SitePlan
    from passes.site import AttentionSite

    site = AttentionSite(name="s", index=0, spelling="sdpa", causal=True, mask_kind="causal", is_cross=False,
                         num_heads=1, num_kv_heads=1, head_dim=8, v_head_dim=8, q_len=64, kv_len=64, batch=1,
                         scale=8 ** -0.5)
    opts = [Candidate(f"v{i}", {"i": i}, t, error=e) for i, (t, e) in enumerate(seconds_and_errors)]
    return SitePlan(site, Candidate("dense", {}, dense_s, exact=True, error=0.0), sorted(opts, key=lambda c: c.seconds))


def test_search_caps_site_errors_and_ranks_near_ties_by_accuracy():
    from passes.planner import search

    evaluate = lambda assignment: (0.0, None)  # noqa: E731  the model hides every site error
    # v0 is cheapest but its site error is over the cap; v1 and v2 are within 25% of each other
    sp = _site([(0.10, 0.9), (0.40, 0.20), (0.45, 0.05), (0.90, 0.01)])
    out = search([sp], [[]], evaluate, budget=0.5, site_cap=0.3)
    assert out.sites[0].chosen.variant == "v2", out.sites[0].note
    sp = _site([(0.10, 0.9), (0.40, 0.20), (0.45, 0.05), (0.90, 0.01)])
    out = search([sp], [[]], evaluate, budget=0.5, site_cap=None)
    assert out.sites[0].chosen.variant == "v0"
    # two near-equal candidates: a 20% wobble of either's predicted time does not change the choice
    for wobble in (0.8, 1.0, 1.2):
        sp = _site([(0.45 * wobble, 0.20), (0.45, 0.05)])
        assert search([sp], [[]], evaluate, budget=0.5).sites[0].chosen.variant == "v1"


def _plain_sums(a, b, name, pad):
    """The metric sums over whole float64 tensors (what the bounded-memory steps must add up to)."""
    a, b = a.double(), b.double()
    v = metrics._valid(a, pad)
    if name == "kl":
        kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
        kl = kl if v is None else kl[v]
        return float(kl.sum()), kl.numel()
    d, r = (a - b).pow(2), a.pow(2)
    if v is not None:
        d, r = d[v], r[v]
    return float(d.sum()), float(r.sum())


@pytest.mark.parametrize("shape", [(3, 37, 101), (2, 5, 7, 33), (5, 11), (13,)])
def test_metric_steps_add_up_to_the_whole(monkeypatch, shape):
    """KL, L2 and next-token NLL in bounded steps equal the whole-tensor sums, padding included."""
    monkeypatch.setattr(metrics, "_CHUNK", 97)  # many steps, none aligned with a row
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    pads = [None] + ([torch.rand(shape[:2], generator=gen) > 0.3] if len(shape) >= 3 else [])
    for name in (["kl"] if len(shape) >= 2 else []) + ["l2"]:
        for pad in pads:
            got, want = metrics.sums(a, b, name, pad), _plain_sums(a, b, name, pad)
            assert got == pytest.approx(want, rel=1e-9), (name, pad is None)
    if len(shape) == 3:
        ids = torch.randint(0, shape[-1], shape[:2], generator=gen)
        for pad in pads:
            total, n = metrics._next_token_nll(a, ids, pad)
            nll = F.cross_entropy(a[:, :-1].double().reshape(-1, shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").view(shape[0], -1)
            keep = torch.ones_like(nll, dtype=torch.bool) if pad is None else pad[:, 1:] & pad[:, :-1]
            assert float(total) == pytest.approx(float(nll[keep].sum()), rel=1e-9) and n == int(keep.sum())


def test_relative_l2_in_steps_equals_the_whole(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 101)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 17, 29, generator=gen), torch.randn(3, 17, 29, generator=gen)
    c = torch.randn(29, generator=gen)
    want = float((a.double() - b.double()).norm() / a.double().norm())
    assert metrics.relative_l2((a, {"x": a}), (b, {"x": b})) == pytest.approx(want, rel=1e-9)
    want_b = float((a.double() - c.double()).norm() / a.double().norm())
    assert metrics.relative_l2(a, c) == pytest.approx(want_b, rel=1e-9)
