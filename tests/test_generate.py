"""``generate()`` through ``torch.compile(backend="rewriter")`` with the KV cache: decode steps are sites with one
query; a dense plan gives exactly eager's greedy tokens; a sparse plan runs the same variant in every decode step;
a growing cache never recompiles per length."""
from __future__ import annotations

import pytest
import torch

import rewriter.backend as backend
from codegen import ops

transformers = pytest.importorskip("transformers")
from tests.hf_fixtures import build  # noqa: E402

NEW = 7


def _prompts(batch: int, length: int, seed: int, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (how generate() batches them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, : length // 3] = 0
        ids[-1, : length // 3] = 0
    return ids, mask


def _generate(model, ids, mask):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              min_new_tokens=NEW, pad_token_id=0)


def _compile(model, **options):
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    torch._dynamo.utils.counters.clear()
    model.forward = torch.compile(model.forward, backend="rewriter", options=options or None)
    return model


@pytest.mark.parametrize("family, impl", [("llama", "sdpa"), ("gpt2", "eager")])
def test_generate_dense_equals_eager_greedy_tokens(family, impl):
    model, _ = build(family, impl)
    layers = model.config.num_hidden_layers
    ids, mask = _prompts(2, 11, seed=3)
    ref = _generate(model, ids, mask)
    _compile(model)
    with ops.recording() as calls:
        out = _generate(model, ids, mask)
    assert torch.equal(out, ref), (out, ref)
    # Every forward (the prefill and each of the NEW - 1 decode steps) ran the rewritten op at every layer.
    assert len(calls) == layers * NEW, len(calls)
    assert [tuple(c["q"].shape[-2:-1]) for c in calls[layers:]] == [(1,)] * (layers * (NEW - 1))
    assert all(c["variant"] == "dense" for c in calls)
    # The cache grows by one key per step; the decode graph serves every length (prefill, first decode,
    # then one dynamic decode graph), instead of one compile per step.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3, dict(torch._dynamo.utils.counters["stats"])


def test_generate_sliding_window_decodes_with_the_prefills_variant():
    """Llama forced to sliding_window(W) generates exactly what Mistral with the same weights and window W does."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    window = 4
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    mistral = MistralForCausalLM(MistralConfig(**kw, sliding_window=window)).eval()
    mistral.load_state_dict(llama.state_dict())
    ids, mask = _prompts(1, 13, seed=5)
    full, windowed = _generate(llama, ids, mask), _generate(mistral, ids, mask)
    assert not torch.equal(full, windowed)  # the window changes what this model generates

    _compile(llama, variants={"sliding_window": {"window": window}})
    with ops.recording() as calls:
        out = _generate(llama, ids, mask)
    assert torch.equal(out, windowed), (out, windowed)
    assert len(calls) == 2 * NEW and all(c["variant"] == "sliding_window" for c in calls)
    assert all(c["params"]["window"] == window for c in calls)


def test_backend_options_are_checked_before_compiling():
    model, inputs = build("llama", "sdpa")
    for options, words in [({"variants": ["flash9"]}, "sliding_window"), ({"varients": ["dense"]}, "variants"),
                           ({"variants": {"sliding_window": {"windw": 3}}}, "window")]:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="rewriter", options=options)
        with pytest.raises(Exception) as err, torch.no_grad():
            compiled(**inputs)
        assert words in str(err.value), str(err.value)
