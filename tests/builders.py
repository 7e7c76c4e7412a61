"""Small shared builders for the tests: random attention operands, the masks the op takes, a causal model."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def qkv(b: int, h: int, g: int, p: int, m: int, e: int, f: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random q [b,h,p,e], k [b,g,m,e], v [b,g,m,f] (g < h is GQA/MQA)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, p, e, generator=gen), torch.randn(b, g, m, e, generator=gen),
            torch.randn(b, g, m, f, generator=gen))


def masks(b: int, h: int, p: int, m: int, seed: int = 1) -> dict:
    """Each mask kind the op takes, by name; the padding ones hide the last 3 keys of batch row 0."""
    gen = torch.Generator().manual_seed(seed)
    pad = torch.ones(b, 1, 1, m, dtype=torch.bool)
    pad[0, ..., -3:] = False
    return {
        "none": None,
        "padding": pad,
        "additive_padding": torch.zeros(b, 1, 1, m).masked_fill(~pad, float("-inf")),
        "bool": torch.rand(b, 1, p, m, generator=gen) > 0.2,
        "additive": torch.randn(b, h, p, m, generator=gen),
    }


class Causal(nn.Module):
    """Causal self-attention through SDPA with a fused qkv projection: the smallest model with one site."""

    def __init__(self, d: int = 32, h: int = 4):
        super().__init__()
        self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, d))
