"""Small, deterministic Hugging Face models built from random configs, for the rewriter's tests.

One builder per family. Each returns ``(model, inputs)`` where ``inputs`` is a dict of keyword
arguments for ``model(**inputs)``. Models are in eval mode, float32, on CPU, with seeded random
weights; no hub access is needed. Sizes are deliberately awkward (sequence lengths 7 and 13,
batch 2) and masks carry real padding (trailing zeros in one row).

    model, inputs = build("llama", "sdpa")
    model, inputs = build_llama("eager", input_seed=3)   # same weights, fresh inputs

``input_seed`` changes the input values (and the padding length) but never their shapes, so an
optimized model captured on one set of inputs can be checked on another without re-capturing.
``make_inputs(family, input_seed, mask)`` gives fresh inputs for an already built model.
``mask`` picks the attention_mask a builder passes (see ``MASKS``): "padded", "ones" or "none".
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

BATCH = 2
SEQ = 13  # encoder / single-stack sequence length
DEC_SEQ = 7  # decoder sequence length for encoder-decoder models
VOCAB = 97

FAMILIES = ("bert", "gpt2", "llama", "t5", "vit", "whisper")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _padding_mask(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """All ones, except the last row, which ends in 2..seq//2 zeros (real right padding)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad = int(torch.randint(2, max(3, seq // 2 + 1), (1,), generator=gen))
    mask[-1, seq - pad:] = 0
    return mask


def _ids(batch: int, seq: int, gen: torch.Generator, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=gen)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- inputs


def bert_inputs(input_seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> dict:
    gen = torch.Generator().manual_seed(1000 + input_seed)
    return {
        "input_ids": _ids(batch, seq, gen),
        "attention_mask": _padding_mask(batch, seq, gen),
        "token_type_ids": torch.randint(0, 2, (batch, seq), generator=gen),
    }


def gpt2_inputs(input_seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> dict:
    """Causal LM inputs with an all-ones attention mask (no padding: causal only)."""
    gen = torch.Generator().manual_seed(2000 + input_seed)
    return {"input_ids": _ids(batch, seq, gen), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def gpt2_padded_inputs(input_seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> dict:
    """Causal LM inputs with right padding in the last row (causal and padding)."""
    gen = torch.Generator().manual_seed(2500 + input_seed)
    return {"input_ids": _ids(batch, seq, gen), "attention_mask": _padding_mask(batch, seq, gen)}


llama_inputs = gpt2_inputs
llama_padded_inputs = gpt2_padded_inputs


def t5_inputs(input_seed: int = 0, batch: int = BATCH, seq: int = SEQ, dec_seq: int = DEC_SEQ) -> dict:
    gen = torch.Generator().manual_seed(3000 + input_seed)
    return {
        "input_ids": _ids(batch, seq, gen),
        "attention_mask": _padding_mask(batch, seq, gen),
        "decoder_input_ids": _ids(batch, dec_seq, gen),
    }


def vit_inputs(input_seed: int = 0, batch: int = BATCH, image: int = 20, channels: int = 3) -> dict:
    gen = torch.Generator().manual_seed(4000 + input_seed)
    return {"pixel_values": torch.randn(batch, channels, image, image, generator=gen)}


def whisper_inputs(input_seed: int = 0, batch: int = BATCH, mel_bins: int = 16, frames: int = 2 * SEQ,
                   dec_seq: int = DEC_SEQ) -> dict:
    gen = torch.Generator().manual_seed(5000 + input_seed)
    return {
        "input_features": torch.randn(batch, mel_bins, frames, generator=gen),
        "decoder_input_ids": _ids(batch, dec_seq, gen),
    }


# ----------------------------------------------------------------------------- models


def build_bert(attn_implementation: str = "eager", seed: int = 0, input_seed: int = 0, mask: str = "padded"):
    """BertModel, 2 layers, hidden 48, 4 heads (head_dim 12), padding mask -> 2 bidirectional sites."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
    )
    return _finish(BertModel(config, add_pooling_layer=False)), make_inputs("bert", input_seed, mask)


def build_gpt2(attn_implementation: str = "eager", seed: int = 0, input_seed: int = 0, mask: str = "ones"):
    """GPT2LMHeadModel, 2 layers, n_embd 32, 4 heads (head_dim 8) -> 2 causal sites."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, attn_implementation=attn_implementation,
    )
    return _finish(GPT2LMHeadModel(config)), make_inputs("gpt2", input_seed, mask)


def build_llama(attn_implementation: str = "eager", seed: int = 0, input_seed: int = 0, mask: str = "ones"):
    """LlamaForCausalLM, 2 layers, hidden 64, 4 heads / 2 KV heads (GQA, head_dim 16) -> 2 causal sites."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn_implementation,
    )
    return _finish(LlamaForCausalLM(config)), make_inputs("llama", input_seed, mask)


def build_t5(attn_implementation: str = "eager", seed: int = 0, input_seed: int = 0, mask: str = "padded"):
    """T5Model, 1 encoder + 1 decoder layer, d_model 32, 4 heads, d_kv 8 -> 3 sites (enc self, dec self, cross)."""
    from transformers import T5Config, T5Model

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, attn_implementation=attn_implementation,
    )
    return _finish(T5Model(config)), make_inputs("t5", input_seed, mask)


def build_vit(attn_implementation: str = "eager", seed: int = 0, input_seed: int = 0, mask: str = "none"):
    """ViTModel, 2 layers, hidden 48, 4 heads (head_dim 12), 20x20 image, patch 5 -> 17 tokens, 2 sites."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=20,
        patch_size=5, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
    )
    return _finish(ViTModel(config, add_pooling_layer=False)), make_inputs("vit", input_seed, mask)


def build_whisper(attn_implementation: str = "eager", seed: int = 0, input_seed: int = 0, mask: str = "none"):
    """WhisperModel, 1 encoder + 1 decoder layer, d_model 32, 4 heads (head_dim 8), 13 audio positions.

    Sites: encoder self (13x13), decoder self causal (7x7), decoder cross (7x13).
    """
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, d_model=32, max_source_positions=SEQ,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None, attn_implementation=attn_implementation,
    )
    return _finish(WhisperModel(config)), make_inputs("whisper", input_seed, mask)


BUILDERS: dict[str, Callable] = {
    "bert": build_bert,
    "gpt2": build_gpt2,
    "llama": build_llama,
    "t5": build_t5,
    "vit": build_vit,
    "whisper": build_whisper,
}

INPUTS: dict[str, Callable] = {
    "bert": bert_inputs,
    "gpt2": gpt2_inputs,
    "llama": llama_inputs,
    "t5": t5_inputs,
    "vit": vit_inputs,
    "whisper": whisper_inputs,
}


def build(family: str, attn_implementation: str = "eager", seed: int = 0, input_seed: int = 0,
          mask: Optional[str] = None):
    """``(model, inputs)`` for ``family`` in FAMILIES with the given attention implementation."""
    mask = MASKS[family][0] if mask is None else mask
    return BUILDERS[family](attn_implementation, seed=seed, input_seed=input_seed, mask=mask)


# Which attention_mask each family can be given: the first is the builder's default.
MASKS: dict[str, tuple[str, ...]] = {
    "bert": ("padded", "none"),
    "gpt2": ("ones", "padded", "none"),
    "llama": ("ones", "padded", "none"),
    "t5": ("padded", "none"),
    "vit": ("none",),
    "whisper": ("none",),
}


def make_inputs(family: str, input_seed: int = 0, mask: Optional[str] = None) -> dict:
    """Fresh inputs for ``family`` with the same shapes as the builder's, different values.

    ``mask``: "padded" (right padding in the last row), "ones" (an all-ones attention_mask) or
    "none" (no attention_mask argument); None = the family's default (``MASKS[family][0]``).
    """
    mask = MASKS[family][0] if mask is None else mask
    if mask not in MASKS[family]:
        raise ValueError(f"{family} takes mask in {MASKS[family]}, not {mask!r}")
    if family in ("gpt2", "llama"):
        inputs = (gpt2_padded_inputs if mask == "padded" else gpt2_inputs)(input_seed)
    else:
        inputs = INPUTS[family](input_seed)
    if mask == "none":
        inputs.pop("attention_mask", None)
    return inputs
