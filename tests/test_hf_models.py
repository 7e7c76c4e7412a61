"""Hugging Face families from small random configs, eager and sdpa: every attention found with the
right flags, and the dense rewrite equal to the original on fresh inputs.

Models come from ``hf_fixtures`` (deterministic, tiny, awkward sizes, real padding). Expectations
are written from what each architecture computes, not from what the finder reports:

* a mask taken from an ``attention_mask`` input is ``padding`` (its values are only known at run
  time, even when the example happens to be all ones); a causal LM with it is still ``causal``;
* with no ``attention_mask`` a causal LM's only mask is the causal one: ``mask_kind == "causal"``;
* T5 adds a learned relative-position bias to the scores of its self-attentions, so those masks
  are ``additive`` (its cross-attention has no bias: ``padding`` from the encoder mask);
* ViT and Whisper's encoder take no mask (``none``); Whisper's decoder self-attention is causal.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hf_fixtures import ATTN_IMPLEMENTATIONS, BATCH, DEC_SEQ, SEQ, build, make_inputs

import rewriter

pytest.importorskip("transformers")

TOL = 1e-5
VIT_TOKENS = (20 // 5) ** 2 + 1  # 4x4 patches + CLS


@dataclass(frozen=True)
class Expect:
    name: str
    causal: bool
    mask_kind: Optional[str]  # None: not asserted
    is_cross: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_len: int
    kv_len: int


def _bert(mask):
    kind = "padding" if mask == "padded" else "none"
    return [Expect(f"encoder.layer.{i}.attention.self", False, kind, False, 4, 4, 12, SEQ, SEQ) for i in range(2)]


def _gpt2(mask):
    kind = "causal" if mask == "none" else "padding"
    return [Expect(f"transformer.h.{i}.attn", True, kind, False, 4, 4, 8, SEQ, SEQ) for i in range(2)]


def _llama(mask):
    kind = "causal" if mask == "none" else "padding"
    return [Expect(f"model.layers.{i}.self_attn", True, kind, False, 4, 2, 16, SEQ, SEQ) for i in range(2)]


def _t5(mask):
    return [
        Expect("encoder.block.0.layer.0.SelfAttention", False, "additive", False, 4, 4, 8, SEQ, SEQ),
        Expect("decoder.block.0.layer.0.SelfAttention", True, "additive", False, 4, 4, 8, DEC_SEQ, DEC_SEQ),
        Expect("decoder.block.0.layer.1.EncDecAttention", False, "padding" if mask == "padded" else "none", True,
               4, 4, 8, DEC_SEQ, SEQ),
    ]


def _vit(mask):
    return [Expect(f"layers.{i}.attention", False, "none", False, 4, 4, 12, VIT_TOKENS, VIT_TOKENS) for i in range(2)]


def _whisper(mask):
    return [
        Expect("encoder.layers.0.self_attn", False, "none", False, 4, 4, 8, SEQ, SEQ),
        Expect("decoder.layers.0.self_attn", True, "causal", False, 4, 4, 8, DEC_SEQ, DEC_SEQ),
        Expect("decoder.layers.0.encoder_attn", False, "none", True, 4, 4, 8, DEC_SEQ, SEQ),
    ]


EXPECTED = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "t5": _t5, "vit": _vit, "whisper": _whisper}

def _param(family, impl, mask, marks=()):
    return pytest.param(family, impl, mask, id=f"{family}-{impl}-{mask}", marks=marks)


CASES = [
    _param(f, impl, mask)
    for f, masks in (("bert", ("padded", "none")), ("gpt2", ("ones", "padded", "none")),
                     ("llama", ("ones", "padded", "none")), ("t5", ("padded", "none")), ("vit", ("none",)),
                     ("whisper", ("none",)))
    for impl in ATTN_IMPLEMENTATIONS
    for mask in masks
]


def _check_sites(sites, expected):
    got = [s.name for s in sites]
    assert len(sites) == len(expected), f"expected {len(expected)} sites, found {len(sites)}: {got}"
    for s, e in zip(sites, expected):
        where = f"site {s.index} ({s.describe()})"
        assert s.name == e.name, where
        assert s.rewritable, f"{where}: not rewritable: {s.reason}"
        assert s.causal is e.causal, f"{where}: causal"
        assert s.is_cross is e.is_cross, f"{where}: is_cross"
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (e.num_heads, e.num_kv_heads, e.head_dim), where
        assert (s.q_len, s.kv_len) == (e.q_len, e.kv_len), where
        if e.mask_kind is not None:
            assert s.mask_kind == e.mask_kind, f"{where}: mask_kind"


@pytest.mark.parametrize("family,impl,mask", CASES)
def test_sites(family, impl, mask):
    model, inputs = build(family, impl, mask=mask)
    assert model.config._attn_implementation == impl
    sites = rewriter.find_attention(model, inputs)
    _check_sites(sites, EXPECTED[family](mask))


def _count_rewritten(opt) -> int:
    op = torch.ops.rewriter.attention.default
    return sum(1 for n in opt.program.graph.nodes if n.op == "call_function" and n.target is op)


def _remaining_attention(opt) -> list[str]:
    names = ("softmax", "_softmax", "scaled_dot_product_attention", "_scaled_dot_product")
    return [
        n.name for n in opt.program.graph.nodes
        if n.op == "call_function" and any(getattr(n.target, "__name__", "").startswith(x) for x in names)
    ]


def _no_cache(model) -> dict:
    """The optimized model never returns a KV cache; compare with the original called likewise."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@pytest.fixture
def dense_calls(monkeypatch):
    """Counts calls of the dense kernel (proves the rewritten op, not the original graph, runs)."""
    from codegen import ops

    calls = []
    kernel = ops.KERNELS["dense"]

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return kernel(*args, **kwargs)

    monkeypatch.setitem(ops.KERNELS, "dense", counting)
    return calls


@pytest.mark.parametrize("family,impl,mask", CASES)
def test_dense_rewrite(family, impl, mask, dense_calls):
    model, inputs = build(family, impl, mask=mask)
    n = len(EXPECTED[family](mask))
    opt = rewriter.optimize(model, inputs, variants=["dense"], budget=None)

    decisions = opt.plan.decisions
    assert len(decisions) == n
    assert [d.variant for d in decisions] == ["dense"] * n, str(opt.plan)
    assert opt.plan.error is not None and opt.plan.error <= TOL, str(opt.plan)
    assert _count_rewritten(opt) == n
    assert _remaining_attention(opt) == [], "the original attention is still in the rewritten graph"

    # Fresh inputs, same shapes, different values (and padding length): no re-capture.
    for seed in (11, 12):
        fresh = make_inputs(family, seed, mask)
        dense_calls.clear()
        with torch.no_grad():
            ref = model(**fresh, **_no_cache(model))
            out = opt(**fresh)
        assert len(dense_calls) == n, "the rewritten op did not run once per site"
        assert type(out) is type(ref)
        assert list(out.keys()) == list(ref.keys())
        err = rewriter.relative_l2(ref, out)
        assert err <= TOL, f"{family}/{impl}/{mask}: relative L2 {err:.2e} on fresh inputs"
        assert all(shape[0] == BATCH for shape in dense_calls)
