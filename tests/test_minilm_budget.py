"""all-MiniLM-L6-v2 with real weights at budget 0.05 on padded English sentences (the planner issue's target).

Sentences are ~10-190 tokens padded to 256. block_sparse spends its kept key blocks on real keys only
(a block the padding mask hides wholly is never chosen), so it is exact on sentences whose real keys fit
the kept blocks and approximate on longer ones; the planner measures that on the calibration rows.
"""
from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter import lm, models


def _sentences(tok, n: int, seed: int) -> list[str]:
    text = lm.corpus("heldout").decode()
    parts = [p.strip().replace("\n", " ") for p in text.split(". ") if 40 < len(p.strip()) < 600]
    g = torch.Generator().manual_seed(seed)
    return [parts[i] for i in torch.randperm(len(parts), generator=g)[:n].tolist()]


@pytest.mark.slow
def test_minilm_budget_plan_is_not_all_dense_and_keeps_embeddings():
    from transformers import AutoTokenizer

    model, _ = models.minilm()
    tok = AutoTokenizer.from_pretrained(models.minilm_dir())
    enc = lambda xs: dict(tok(xs, padding="max_length", truncation=True, max_length=256, return_tensors="pt"))  # noqa: E731
    calib, held = enc(_sentences(tok, 16, 0)), enc(_sentences(tok, 8, 1))
    opt = rewriter.optimize(model, calib, budget=0.05)
    assert any(d.variant not in ("dense", "original") for d in opt.plan.decisions), str(opt.plan)
    with torch.no_grad():
        ref, out = model(**held), opt(**held)
    from passes import metrics

    assert metrics.error(ref, out, None, held["attention_mask"].bool()) <= 0.10
    pad = held["attention_mask"].unsqueeze(-1).float()
    emb = lambda o: (o.last_hidden_state * pad).sum(1) / pad.sum(1)  # noqa: E731
    assert float(torch.nn.functional.cosine_similarity(emb(ref), emb(out)).mean()) >= 0.99
