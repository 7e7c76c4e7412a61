"""Pipeline stages (passes/stages.py): the split, its weights, and the attention each stage still shows."""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from passes.capture import analyse
from passes.stages import Stage, materialise, meta_parameters, place, run_stages, safetensors_loader, split_stages

transformers = pytest.importorskip("transformers")

B, T = 3, 37  # awkward sizes: no block size or power of two divides them
LAYERS = 4


class MaskedBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        s = (q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)).masked_fill(~keep, float("-inf"))
        x = x + self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class PreludeMaskGPT(nn.Module):
    """Token and learned position embeddings; the causal mask is built once, before the blocks, from arange
    comparisons and handed to every block, so a later stage must rebuild it to see a causal mask."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, layers: int = LAYERS, positions: int = 64,
                 skip: bool = False):
        super().__init__()
        self.skip = skip  # every block's input also gets the embeddings (a value stage 0 makes, all stages read)
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.blocks = nn.ModuleList(MaskedBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        i = torch.arange(ids.shape[1], device=ids.device)
        keep = i[:, None] >= i[None, :]
        x = x0 = self.tok(ids) + self.pos(i)
        for blk in self.blocks:
            x = blk(x, keep)
            if self.skip:
                x = x + 0.5 * x0
        return self.head(self.norm(x))


def llama_config(tie: bool = False):
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=tie)


def llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(tie)).eval()


def llama_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 29:] = 0  # one padded row, so the mask is not only causal
    return {"input_ids": torch.randint(0, 256, (B, T), generator=g), "attention_mask": mask}


def gpt(skip: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return PreludeMaskGPT(skip=skip).eval()


def gpt_inputs(seed: int) -> dict:
    return {"ids": torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))}


MODELS = {"llama": (llama, llama_inputs), "gpt": (gpt, gpt_inputs), "skip": (lambda: gpt(skip=True), gpt_inputs)}
CASES = [("llama", 2), ("llama", 3), ("gpt", 2), ("gpt", 3), ("skip", 3)]
_splits: dict = {}


def split(name: str, count: int) -> tuple[nn.Module, list[Stage]]:
    """The model and its stages, made once per case (a split exports the model)."""
    if (name, count) not in _splits:
        build, inputs = MODELS[name]
        model = build()
        example = inputs(0) if name == "llama" else inputs(0)["ids"]  # the GPTs are called positionally
        _splits[name, count] = model, split_stages(model, example, count)
    return _splits[name, count]


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def stage_kwargs(stages: list[Stage], kw: dict) -> list[dict]:
    """Each stage's keyword inputs on ``kw``: the model inputs it reads and the activations it receives."""
    out, carried = [], ()
    with torch.no_grad():
        for stage in stages:
            args = {n: kw[n] for n in stage.model_inputs}
            args.update(zip(stage.received, carried))
            out.append(args)
            carried = stage.module(**args)
    return out


@pytest.mark.parametrize("name,count", CASES)
def test_run_stages_equals_model(name, count):
    model, stages = split(name, count)
    kw = MODELS[name][1](1)  # fresh inputs, not the example's
    with torch.no_grad():
        want, got = model(**kw), run_stages(stages, kw)
    assert type(got) is type(want)
    torch.testing.assert_close(logits(got), logits(want), atol=1e-5, rtol=1e-5)
    assert [s.index for s in stages] == list(range(count)) and all(s.count == count for s in stages)
    assert stages[0].received == () and stages[-1].sent == ()
    for prev, stage in zip(stages, stages[1:]):
        assert stage.received == prev.sent and stage.blocks[0] == prev.blocks[1]
    assert stages[0].blocks[0] == 0 and stages[-1].blocks[1] == LAYERS
    for stage in stages:
        assert stage.inputs == stage.model_inputs + stage.received
        assert stage.inputs == tuple(n.target for n in stage.module.graph.nodes if n.op == "placeholder")
        assert set(stage.model_inputs) <= set(kw)
    for stage in stages[:-1]:
        out = stage.module(**stage_kwargs(stages, kw)[stage.index])
        assert isinstance(out, tuple) and len(out) == len(stage.sent)
    if name == "skip":  # the embeddings stage 0 makes pass through stage 1 to stage 2
        assert len(stages[0].sent) == len(stages[1].sent) == 2 and stages[0].sent[0] in stages[1].sent
    else:  # only the hidden state travels: masks and rotary tables are rebuilt
        assert all(len(stage.sent) == 1 for stage in stages[:-1])


@pytest.mark.parametrize("name,count", CASES)
def test_weights_partition_the_state_dict(name, count):
    """Every state-dict entry sits in a stage, as the model's own tensor, and every parameter in exactly one.

    The exception is buffers: one that prelude values are built from (rotary inv_freq, non-persistent, in no
    state dict) is held by every stage that rebuilds them. A buffer forward never reads (Llama's
    original_inv_freq) is in no stage.
    """
    model, stages = split(name, count)
    tensors = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
    params = dict(model.named_parameters())
    held: dict[str, list[int]] = {}
    for stage in stages:
        own = {**dict(stage.module.named_buffers()), **dict(stage.module.named_parameters())}
        assert set(stage.weights) == {n for n in own if not n.startswith("_stage_constants")}
        for n in stage.weights:
            assert own[n] is tensors[n]  # shared, never copied
            held.setdefault(n, []).append(stage.index)
    quiet = set(tensors) - set(model.state_dict())
    assert set(model.state_dict()) <= set(held) <= set(tensors)
    assert {n for n, s in held.items() if len(s) > 1} <= quiet
    assert {n: s for n, s in held.items() if n in params and len(s) != 1} == {}
    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    share = max(per_block) * math.ceil(LAYERS / count)
    first = {n for n in params if n.startswith(("model.embed_tokens", "tok", "pos"))}
    last = {n for n in params if n.startswith(("model.norm", "lm_head", "norm", "head"))}
    for stage in stages:
        a, z = stage.blocks
        extra = (first if stage.index == 0 else set()) | (last if stage.index == count - 1 else set())
        held_params = {n for n in stage.weights if n in params}
        inside = sum(params[n].numel() for n in held_params - extra)
        assert inside == sum(per_block[a:z]) <= share
        assert sum(params[n].numel() for n in held_params & extra) == sum(params[n].numel() for n in extra)


@pytest.mark.parametrize("name,count", CASES)
def test_each_stage_finds_its_attention_as_the_whole_model_does(name, count):
    """The prelude's mask is rebuilt inside every stage, so each site keeps its causal flag and mask."""
    model, stages = split(name, count)
    kw = MODELS[name][1](2)
    _, _, whole, _ = analyse(model, kw)
    found = []
    for stage, args in zip(stages, stage_kwargs(stages, kw)):
        _, _, sites, _ = analyse(stage.module, args)
        found += [m.site for m in sites]
    assert len(whole) == LAYERS
    assert [s.describe() for s in found] == [m.site.describe() for m in whole]
    assert [(s.causal, s.mask_kind) for s in found] == [(m.site.causal, m.site.mask_kind) for m in whole]
    assert all(s.causal for s in found)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_meta_parameters_materialised_from_a_checkpoint(tmp_path, tie):
    from safetensors import safe_open

    real = llama(tie)
    # the untied model in shards, read through model.safetensors.index.json; the tied one in one file
    real.save_pretrained(tmp_path, **({} if tie else {"max_shard_size": "200KB"}))
    saved = set()
    for path in tmp_path.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            saved |= set(f.keys())
    assert (tmp_path / "model.safetensors.index.json").exists() is not tie
    assert ("lm_head.weight" in saved) is not tie  # a tied head is saved once, as the embedding
    with meta_parameters():
        meta = transformers.LlamaForCausalLM(llama_config(tie)).eval()
    assert all(p.is_meta for p in meta.parameters())
    assert not any(b.is_meta for b in meta.buffers())  # rotary inv_freq: real, and in no checkpoint
    stages = split_stages(meta, llama_inputs(0), 2)
    assert stages[-1].module.get_parameter("lm_head.weight").is_meta
    # a tied head is held under its own name by the last stage, the embedding by the first
    assert "model.embed_tokens.weight" in stages[0].weights and "model.embed_tokens.weight" not in stages[1].weights
    assert "lm_head.weight" in stages[1].weights and "lm_head.weight" not in stages[0].weights
    load = safetensors_loader(tmp_path, meta)
    for stage in stages:
        materialise(stage, load)
        assert not any(t.is_meta for t in [*stage.module.parameters(), *stage.module.buffers()])
    assert all(p.is_meta for p in meta.parameters())  # the meta model itself is left as it was
    kw = llama_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(run_stages(stages, kw).logits, real(**kw).logits, atol=1e-5, rtol=1e-5)


def test_count_errors():
    model = gpt()
    with pytest.raises(ValueError, match=r"cannot split 4 repeated blocks .* into 5 stages; pass count <= 4"):
        split_stages(model, gpt_inputs(0)["ids"], 5)
    with pytest.raises(ValueError, match="pass count >= 1"):
        split_stages(model, gpt_inputs(0)["ids"], 0)


class Reversed(PreludeMaskGPT):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        i = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(i)
        for blk in reversed(self.blocks):
            x = blk(x, i[:, None] >= i[None, :])
        return self.head(x)


class Branching(PreludeMaskGPT):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        return x if x.sum() > 0 else -x  # a branch on a value: export cannot capture it


def test_graphs_the_splitter_cannot_handle():
    ids = gpt_inputs(0)["ids"]
    with pytest.raises(ValueError, match="do not run one after another"):
        split_stages(Reversed().eval(), ids, 2)
    with pytest.raises(ValueError, match=r"^cannot split Branching: could not capture Branching"):
        split_stages(Branching().eval(), ids, 2)


class CondBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.shift = torch.tensor([0.5])  # a plain tensor attribute: export lifts it as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cond(x.sum() > 0, lambda a: a * 2, lambda a: a - 1, (self.lin(x),))
        return y + self.shift


class CondModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(CondBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x) * torch.tensor(3.0)  # a constant made in forward
        for blk in self.blocks:
            x = blk(x)
        return x


def test_constants_and_subgraphs_go_with_their_stage():
    """Tensor constants (attributes, ones made in forward) keep their real values, and a torch.cond's branch
    graphs go with the stage that runs it."""
    torch.manual_seed(0)
    model = CondModel().eval()
    stages = split_stages(model, torch.randn(4, 8), 3)
    assert stages[1].weights == ("blocks.1.lin.weight", "blocks.1.lin.bias")
    for x in (torch.randn(4, 8), -100 * torch.ones(4, 8)):  # both branches
        with torch.no_grad():
            torch.testing.assert_close(run_stages(stages, {"x": x}), model(x))


def test_model_without_repeated_blocks():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"Sequential has no repeated blocks .*keep its layers in an nn.ModuleList"):
        split_stages(model, torch.randn(2, 8), 2)


def test_checkpoint_missing_a_name_or_with_a_wrong_shape(tmp_path):
    from safetensors.torch import save_file

    real = llama()
    state = {k: v.contiguous() for k, v in real.state_dict().items()}
    (tmp_path / "missing").mkdir()
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, str(tmp_path / "missing/model.safetensors"))
    (tmp_path / "wrong").mkdir()
    save_file({**state, "model.norm.weight": torch.ones(63)}, str(tmp_path / "wrong/model.safetensors"))
    with meta_parameters():
        meta = transformers.LlamaForCausalLM(llama_config()).eval()
    last = split_stages(meta, llama_inputs(0), 2)[-1]
    with pytest.raises(ValueError, match=r"holds no tensor for \['model.norm.weight'\]"):
        materialise(last, safetensors_loader(tmp_path / "missing", meta))
    with pytest.raises(ValueError, match=r"shapes differ for model.norm.weight \(checkpoint model.norm.weight "
                                         r"\(63,\), model \(64,\)\)"):
        materialise(last, safetensors_loader(tmp_path / "wrong", meta))
    assert last.module.get_parameter("model.norm.weight").is_meta  # nothing replaced on failure

    def short(names):
        return {n: torch.zeros(1) for n in names if n != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"returned no tensor for \['lm_head.weight'\]"):
        materialise(last, short)
    with pytest.raises(ValueError, match="no \\*.safetensors file"):
        safetensors_loader(tmp_path, meta)


def test_stage_survives_export_on_fresh_process_inputs():
    """A stage re-exports (as the distributed runner will) and the exported program equals the stage."""
    _, stages = split("gpt", 3)
    args = stage_kwargs(stages, gpt_inputs(4))[1]
    t0 = time.perf_counter()
    ep = torch.export.export(stages[1].module, (), args, strict=False)
    assert time.perf_counter() - t0 < 30
    with torch.no_grad():
        for got, want in zip(ep.module()(**args), stages[1].module(**args)):
            torch.testing.assert_close(got, want)


def test_place_moves_tensors_and_the_graph_device():
    """``place`` retargets what the capture's device baked into the graph (arange(device=...), to(device))."""
    stages = split_stages(gpt(), gpt_inputs(0)["ids"], 2)
    assert "device(type='cpu')" in stages[1].module.code  # the recomputed mask's arange
    for stage in stages:
        place(stage, "meta")
        assert "device(type='cpu')" not in stage.module.code
        assert all(t.is_meta for t in [*stage.module.parameters(), *stage.module.buffers()])
    out = run_stages(stages, {"ids": gpt_inputs(1)["ids"].to("meta")})
    assert out.is_meta and out.shape == (B, T, 64)


def test_rewritten_stages_equal_the_rewritten_model():
    """Each stage goes through the project's whole optimize (capture, find, rewrite) on its own; chained,
    the rewritten stages give what the rewritten whole model gives."""
    import rewriter

    model, stages = split("gpt", 2)
    forced = {"variants": {"sliding_window": {"window": 8}}, "budget": None, "dynamic": False}
    whole = rewriter.optimize(model, gpt_inputs(0)["ids"], **forced)
    parts = [rewriter.optimize(stage.module, args, **forced)
             for stage, args in zip(stages, stage_kwargs(stages, gpt_inputs(0)))]
    assert [d.variant for p in parts for d in p.plan.decisions] == ["sliding_window"] * LAYERS
    kw = gpt_inputs(5)
    carried = ()
    with torch.no_grad():
        for stage, part in zip(stages, parts):
            carried = part(**{n: kw[n] for n in stage.model_inputs}, **dict(zip(stage.received, carried)))
        want = whole(kw["ids"])
        torch.testing.assert_close(carried, want, atol=1e-5, rtol=1e-5)
        assert (want - model(kw["ids"])).abs().max() > 1e-2  # the window did change the model
