"""Plans for models on the meta device: every site priced for the target, and honest about what was not measured."""
from __future__ import annotations

import pytest
import torch

import rewriter

transformers = pytest.importorskip("transformers")


def _llama(layers: int = 3, n: int = 2048):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=384, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    return model, {"input_ids": torch.zeros(1, n, dtype=torch.long, device="meta")}


@pytest.mark.parametrize("target", ["h100", "a100", "h200", "cpu"])
def test_every_meta_site_gets_a_predicted_speedup_for_the_target(target):
    model, ids = _llama()
    opt = rewriter.optimize(model, ids, target=target)
    assert opt.plan.target == target
    for d in opt.plan.decisions:
        assert d.variant == "dense" and d.predicted_speedup is not None and d.predicted_speedup > 0, str(opt.plan)
        assert d.reason == "exact; not measured (meta device)"


def test_a_forced_window_on_meta_is_approximate_and_priced_faster():
    model, ids = _llama()
    opt = rewriter.optimize(model, ids, target="h100", variants={"sliding_window": {"window": 256}}, budget=None)
    for d in opt.plan.decisions:
        assert d.variant == "sliding_window" and d.error is None
        assert d.reason == "approximate; error not measured (meta device)"
        assert d.predicted_speedup is not None and d.predicted_speedup > 2, str(opt.plan)


def test_unknown_target_lists_the_known_ones():
    model, ids = _llama(layers=1, n=16)
    with pytest.raises(ValueError, match="'h100'"):
        rewriter.optimize(model, ids, target="tpu")
