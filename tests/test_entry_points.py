"""The three ways in (optimize, torch.compile backend, export/load) and what happens on bad input."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import rewriter
import rewriter.backend as backend
from tests.spellings import CASES, E

BY_NAME = {c.name: c for c in CASES}


def _fresh(inputs):
    torch.manual_seed(123)
    return tuple(
        torch.randn_like(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs
    )


def _transformer_layers():
    torch.manual_seed(0)
    x, mem = torch.randn(2, 7, E), torch.randn(2, 5, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    enc = nn.TransformerEncoderLayer(E, 4, 64, batch_first=True).eval()
    dec = nn.TransformerDecoderLayer(E, 4, 64, batch_first=True).eval()
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    return {
        "encoder_layer": (enc, (x, None, pad), 1),
        "decoder_layer": (dec, (x, mem, causal), 2),
    }


@pytest.mark.parametrize("name", ["encoder_layer", "decoder_layer"])
def test_transformer_layers_found_and_exact(name):
    model, inputs, n = _transformer_layers()[name]
    sites = rewriter.find_attention(model, inputs)
    assert len(sites) == n
    if name == "decoder_layer":
        assert [s.is_cross for s in sites] == [False, True]
        assert sites[1].kv_len == 5
    opt = rewriter.optimize(model, inputs, variants=["dense"])
    assert all(d.variant == "dense" for d in opt.plan.decisions)
    assert opt.plan.error < 1e-5


@pytest.mark.parametrize("name", ["matmul_div", "repeat_kv_gqa", "padding_f32_dropout", "einsum_bqhd", "baddbmm_bias",
                                  "mha_need_weights", "sdpa_enable_gqa", "cross"])
def test_torch_compile_backend(name):
    model, inputs = BY_NAME[name].build()
    model.eval()
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    compiled = torch.compile(model, backend="rewriter")  # by entry point name, no import needed
    fresh = _fresh(inputs)
    with torch.no_grad():
        ref, out = model(*fresh), compiled(*fresh)
    assert len(backend.LAST_SITES) == len(BY_NAME[name].expect)
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_backend_is_registered_by_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="torch_dynamo_backends")}
    assert "rewriter" in names


def test_backend_runs_graph_unchanged_when_analysis_fails(monkeypatch):
    model, inputs = BY_NAME["matmul_div"].build()
    model.eval()

    def boom(*a, **k):
        raise RuntimeError("analysis exploded")

    monkeypatch.setattr(backend, "find_matches", boom)
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    with torch.no_grad():
        out = torch.compile(model, backend="rewriter")(*inputs)
        ref = model(*inputs)
    assert backend.LAST_SITES == []
    assert rewriter.relative_l2(ref, out) < 1e-6


def test_export_load_in_fresh_process(tmp_path):
    model, inputs = BY_NAME["repeat_kv_gqa"].build()
    model.eval()
    opt = rewriter.optimize(model, inputs, variants=["dense"])
    rewriter.export(opt, tmp_path / "art")
    fresh = _fresh(inputs)
    with torch.no_grad():
        torch.save((fresh, model(*fresh)), tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, rewriter
        m = rewriter.load({str(tmp_path / 'art')!r})
        inputs, ref = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            err = rewriter.relative_l2(ref, m(*inputs))
        assert [d.variant for d in m.plan.decisions] == ["dense"], m.plan
        print("ERR", err)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    err = float(res.stdout.split("ERR")[1])
    assert err < 1e-5


def test_load_rejects_a_directory_that_is_not_an_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a rewriter artifact"):
        rewriter.load(tmp_path)


class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(E, E), nn.Linear(E, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).softmax(-1)


def test_model_without_attention_comes_back_equivalent():
    model = _NoAttention().eval()
    x = torch.randn(2, 5, E)
    opt = rewriter.optimize(model, x)
    assert opt.plan.decisions == ()
    assert "no attention" in str(opt.plan)
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(E, E)

    def forward(self, x):
        y = self.inner(x)
        if y.sum() > 0:  # Python control flow on a tensor value: export cannot trace it
            return y
        return -y


def test_uncapturable_model_raises_clear_error():
    with pytest.raises(rewriter.CaptureError) as info:
        rewriter.find_attention(_DataDependent(), torch.randn(2, 5, E))
    msg = str(info.value)
    assert "_DataDependent" in msg and "torch.export" in msg


class _ClampedScores(nn.Module):
    """Scores clamped before the softmax: an op rewriter::attention cannot express."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)

    def forward(self, x, keep):
        q, k, v = self.qkv(x).chunk(3, -1)
        s = (q @ k.transpose(-1, -2)).clamp(-3.0, 3.0).masked_fill(~keep[:, None, :], -1e4)
        return s.softmax(-1) @ v


def test_site_that_cannot_be_rewritten_stays_with_reason():
    x = torch.randn(2, 5, E)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 3:] = False
    model = _ClampedScores().eval()
    opt = rewriter.optimize(model, (x, keep))
    (d,) = opt.plan.decisions
    assert d.variant == "original" and "clamp" in d.reason
    assert "original" in str(opt.plan)
    with torch.no_grad():
        assert torch.allclose(opt(x, keep), model(x, keep), atol=1e-6)


def test_unknown_variant_is_a_clear_error():
    model, inputs = BY_NAME["matmul_div"].build()
    with pytest.raises(ValueError, match="unknown variant 'flash9'"):
        rewriter.optimize(model, inputs, variants=["flash9"])


def test_call_with_other_arguments_says_what_to_do():
    model, inputs = BY_NAME["padding_f32_dropout"].build()
    opt = rewriter.optimize(model.eval(), inputs)
    with pytest.raises(TypeError, match="captured with arguments"):
        opt(inputs[0])


def test_new_sequence_length_is_recaptured():
    model, inputs = BY_NAME["masked_fill_triu"].build()
    model.eval()
    opt = rewriter.optimize(model, inputs)
    x = torch.randn(2, 13, E)
    with torch.no_grad():
        assert rewriter.relative_l2(model(x), opt(x)) < 1e-5


def test_meta_device_model_is_found_without_weights():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 9), device="meta")
    sites = rewriter.find_attention(model, {"input_ids": ids})
    assert [(s.causal, s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [(True, 4, 2, 16)] * 3
    opt = rewriter.optimize(model, {"input_ids": ids})  # no weights: rewritten, not measured
    assert [d.variant for d in opt.plan.decisions] == ["dense"] * 3 and opt.plan.error is None


@pytest.mark.parametrize("norm_first", [False, True])
def test_backend_opens_the_encoder_layer_fast_path(norm_first):
    # In eval under torch.compile, TransformerEncoderLayer is one fused op; its attention is still found.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 4, 64, batch_first=True, norm_first=norm_first, activation="gelu")
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    with torch.no_grad():
        out = torch.compile(enc, backend="rewriter")(x, src_key_padding_mask=pad)
        ref = enc(x, src_key_padding_mask=pad)
    assert len(backend.LAST_SITES) == 2
    assert all(s.mask_kind == "padding" for s in backend.LAST_SITES)
    assert rewriter.relative_l2(ref, out) < 1e-5


def test_variant_without_kernel_is_refused_clearly(monkeypatch):
    from codegen import ops

    monkeypatch.delitem(ops.KERNELS, "sliding_window")
    model, inputs = BY_NAME["matmul_div"].build()
    with pytest.raises(ValueError, match="no kernel yet"):
        rewriter.optimize(model, inputs, variants={"sliding_window": {"window": 4}}, budget=None)


@pytest.mark.parametrize("name", ["encoder_layer", "decoder_layer"])
def test_transformer_layers_through_backend_and_export(name, tmp_path):
    model, inputs, n = _transformer_layers()[name]
    torch._dynamo.reset()
    backend.LAST_SITES.clear()
    with torch.no_grad():
        ref = model(*inputs)
        out = torch.compile(model, backend="rewriter")(*inputs)
    assert len(backend.LAST_SITES) == n
    assert rewriter.relative_l2(ref, out) < 1e-5
    opt = rewriter.optimize(model, inputs)
    rewriter.export(opt, tmp_path / "art")
    loaded = rewriter.load(tmp_path / "art")  # same process here; the fresh-process round trip is tested above
    with torch.no_grad():
        assert rewriter.relative_l2(opt(*inputs), loaded(*inputs)) < 1e-6


def test_plan_prices_each_site_with_the_cost_model():
    explicit, inputs = BY_NAME["matmul_div"].build()
    (d,) = rewriter.optimize(explicit.eval(), inputs).plan.decisions
    assert d.predicted_speedup is not None and d.predicted_speedup > 1.0  # three passes -> one fused kernel
    fused, inputs = BY_NAME["sdpa_enable_gqa"].build()
    (d,) = rewriter.optimize(fused.eval(), inputs).plan.decisions
    assert d.predicted_speedup == pytest.approx(1.0)  # SDPA was already the fused kernel
