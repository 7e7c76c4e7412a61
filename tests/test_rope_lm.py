"""The project's second LM (rotary, GQA, Llama-shaped, 2048-byte context): small, trained, found and served."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rewriter
from rewriter import lm, rope_lm

pytestmark = pytest.mark.skipif(not rope_lm.CHECKPOINT.exists(),
                                reason="the trained rotary checkpoint is not in this checkout")


@pytest.fixture(scope="module")
def model() -> rope_lm.RopeLM:
    return rope_lm.load()


def test_checkpoint_is_a_small_rotary_gqa_lm_with_a_long_context(model):
    cfg = model.cfg
    assert rope_lm.CHECKPOINT.stat().st_size <= 20e6
    assert cfg.kv_heads < cfg.heads and cfg.heads % cfg.kv_heads == 0
    assert cfg.context >= 2048
    # positions come from the rotation only: no learned table with a row per position
    assert not any(p.dim() == 2 and p.shape[0] >= cfg.context for p in model.parameters())


def test_held_out_perplexity_is_what_the_checkpoint_says(model):
    meta = torch.load(rope_lm.CHECKPOINT, map_location="cpu", weights_only=True)["meta"]
    held = lm.windows(lm.corpus("heldout"), model.cfg.context, 2, seed=1)
    ppl = lm.perplexity(model, held, chunk=1)
    print(f"held-out per-byte perplexity {ppl:.3f} on 2 windows (checkpoint: {meta['heldout_ppl']:.3f} on 32)")
    assert ppl < 12  # uniform over bytes is 256; an untrained model is above 200
    assert abs(ppl / meta["heldout_ppl"] - 1) < 0.25


@torch.no_grad()
def test_it_reads_the_long_context(model):
    """The last 256 bytes are predicted better with 2048 bytes before them than with 256: real long-range use."""
    held = lm.windows(lm.corpus("heldout"), model.cfg.context, 2, seed=5)
    x, y = held[:, :-1], held[:, 1:]
    long = F.cross_entropy(model(x)[:, -256:].reshape(-1, 256), y[:, -256:].reshape(-1))
    short = F.cross_entropy(model(x[:, -256:]).reshape(-1, 256), y[:, -256:].reshape(-1))
    print(f"loss on the last 256 bytes: {long:.4f} nats with 2048 bytes of context, {short:.4f} with 256")
    assert long < short


def test_found_as_rotary_gqa_sites_and_rewritten_exactly(model):
    calib = lm.windows(lm.corpus("train"), 383, 2, seed=7)
    with torch.no_grad():
        opt = rewriter.optimize(model, calib, variants=["dense"])
    sites = [d.site for d in opt.plan.decisions]
    assert len(sites) == model.cfg.layers, str(opt.plan)
    for s in sites:
        assert s.rewritable and s.causal, s.describe()
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (model.cfg.heads, model.cfg.kv_heads,
                                                             model.cfg.dim // model.cfg.heads)
    ids = lm.windows(lm.corpus("heldout"), 300, 1, seed=2)  # 301 bytes: not the calibration length
    with torch.no_grad():
        torch.testing.assert_close(opt(ids), model(ids), rtol=1e-5, atol=1e-5)
