"""neighborhood_2d: the token grid is found from the patch embedding, class tokens stay global, the kernel runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rewriter
from codegen.ops import recording
from codegen.variants import neighborhood_2d as nb


class TinyViT(nn.Module):
    """Patch embedding (conv) + class and register tokens + two self-attention layers."""

    def __init__(self, image: int = 28, patch: int = 2, dim: int = 32, heads: int = 2, registers: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1 + registers, dim))
        n = (image // patch) ** 2 + 1 + registers
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.1)
        self.layers = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(2))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for attn in self.layers:
            x = x + attn(x, x, x, need_weights=False)[0]
        return x


def test_grid_found_and_kernel_matches_reference():
    torch.manual_seed(0)
    model = TinyViT().eval()
    pixels = torch.randn(2, 3, 28, 28)
    opt = rewriter.optimize(model, pixels, variants={"neighborhood_2d": {"kernel": [5, 5]}}, budget=None)
    for d in opt.plan.decisions:
        assert d.variant == "neighborhood_2d", str(opt.plan)
        assert d.params["grid"] == [14, 14] and d.params["prefix"] == 3 and d.params["kernel"] == [5, 5]
    with torch.no_grad(), recording() as calls:
        opt(torch.randn(2, 3, 28, 28))
    inner = [c for c in calls if c["variant"] == "neighborhood_2d"]
    assert len(inner) == 2
    for c in inner:
        ref = nb.reference(c["q"], c["k"], c["v"], c["mask"], c["scale"], c["causal"], grid=[14, 14], kernel=[5, 5],
                           prefix=3)
        assert rewriter.relative_l2(ref, c["out"]) < 1e-5


def test_sequences_without_a_grid_are_refused_with_the_reason():
    from tests.test_planner import LocalAttention

    model = LocalAttention().eval()
    opt = rewriter.optimize(model, torch.randn(1, 300, 64), variants={"neighborhood_2d": {"kernel": [3, 3]}},
                            budget=None)
    (d,) = opt.plan.decisions
    assert d.variant == "dense" and "no image grid" in d.reason, d.reason


def test_hf_vit_grid():
    pytest.importorskip("transformers")
    from tests.hf_fixtures import build_vit

    model, inputs = build_vit()
    opt = rewriter.optimize(model, inputs, variants={"neighborhood_2d": {"kernel": [3, 3]}}, budget=None)
    for d in opt.plan.decisions:
        assert d.variant == "neighborhood_2d" and d.params["grid"] == [4, 4] and d.params["prefix"] == 1, str(opt.plan)
