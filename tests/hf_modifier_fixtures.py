"""Small random-config Hugging Face families whose attention carries modifiers: soft-capping and
sliding windows (Gemma-2), sliding windows (Mistral), ALiBi (Bloom)."""
from __future__ import annotations

import torch

from tests.hf_fixtures import VOCAB, _finish, gpt2_inputs, gpt2_padded_inputs

FAMILIES = ("gemma2", "mistral", "bloom")


def build_gemma2(impl: str = "eager", seed: int = 0):
    """Gemma2ForCausalLM: 2 layers (sliding window 4, then global), attention soft-cap 5, 4 heads / 2 KV."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                       attn_logit_softcapping=5.0, final_logit_softcapping=None, query_pre_attn_scalar=8,
                       max_position_embeddings=64, attn_implementation=impl)
    return _finish(Gemma2ForCausalLM(cfg))


def build_mistral(impl: str = "eager", seed: int = 0):
    """MistralForCausalLM: 2 layers, sliding window 4, 4 heads / 2 KV heads."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                        max_position_embeddings=64, attn_implementation=impl)
    return _finish(MistralForCausalLM(cfg))


def build_bloom(impl: str = "eager", seed: int = 0):
    """BloomForCausalLM: 2 layers, 4 heads, ALiBi position bias."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                      attention_dropout=0.0, attn_implementation=impl)
    return _finish(BloomForCausalLM(cfg))


BUILDERS = {"gemma2": build_gemma2, "mistral": build_mistral, "bloom": build_bloom}


def build(family: str, impl: str = "eager", input_seed: int = 0, padded: bool = False):
    """``(model, inputs)`` for a family; inputs are causal-LM keyword inputs (seq 13, batch 2)."""
    return BUILDERS[family](impl), (gpt2_padded_inputs if padded else gpt2_inputs)(input_seed)
