"""Two hand-written causal LMs whose masks are built from the runtime length (issue 14, item 3)."""
from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, spelling: str):
        super().__init__()
        self.heads, self.spelling = heads, spelling
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        s = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
        if self.spelling == "arange":
            keep = torch.arange(t, device=x.device)[:, None] >= torch.arange(t, device=x.device)[None, :]
            s = s.masked_fill(~keep, float("-inf"))
        else:
            hide = torch.triu(torch.ones(t, t, device=x.device), 1).bool()
            s = s.masked_fill(hide, float("-inf"))
        y = s.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LengthMaskLM(nn.Module):
    """Token embedding, an optional learned position table indexed by arange(T), causal blocks, LM head."""

    def __init__(self, spelling: str = "arange", vocab: int = 64, dim: int = 32, heads: int = 2, layers: int = 2,
                 positions: int | None = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(positions, dim) if positions else None
        self.blocks = nn.ModuleList(Block(dim, heads, spelling) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def window_reference(model: LengthMaskLM, ids: torch.Tensor, window: int) -> torch.Tensor:
    """The model with each causal mask narrowed to a sliding window (|i - j| < window, j <= i)."""
    import types

    def attend(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        s = q.double() @ k.double().transpose(-2, -1) / math.sqrt(c // self.heads)
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        s = s.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
        y = (s.softmax(-1) @ v.double()).to(x.dtype)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    saved = [blk.attend for blk in model.blocks]
    try:
        for blk in model.blocks:
            blk.attend = types.MethodType(attend, blk)
        with torch.no_grad():
            return model(ids)
    finally:
        for blk, f in zip(model.blocks, saved):
            blk.attend = f
