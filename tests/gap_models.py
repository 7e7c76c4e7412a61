"""Models written the way users write them, one per gap the issue reports (regression fixtures)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

B, N, M, H, D, E = 2, 9, 6, 4, 8, 32


def _heads(x: torch.Tensor, h: int = H) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)


def _merge(y: torch.Tensor) -> torch.Tensor:
    b, h, n, d = y.shape
    return y.transpose(1, 2).reshape(b, n, h * d)


def alibi_slopes(h: int) -> torch.Tensor:
    """ALiBi slopes for h heads (powers of two, as in the paper)."""
    start = 2 ** (-(2 ** -(math.log2(h) - 3)))
    return torch.tensor([start ** (i + 1) for i in range(h)])


class Attn(nn.Module):
    def __init__(self, kv_heads: int = H):
        super().__init__()
        self.q, self.k = nn.Linear(E, H * D), nn.Linear(E, kv_heads * D)
        self.v, self.o = nn.Linear(E, kv_heads * D), nn.Linear(H * D, E)
        self.kv_heads = kv_heads

    def qkv(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        return _heads(self.q(x)), _heads(self.k(ctx), self.kv_heads), _heads(self.v(ctx), self.kv_heads)


class AlibiBaddbmm(Attn):
    """Bloom style: ALiBi kept flattened [B*H, 1, N], added by baddbmm; padding as a float mask."""

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * H, n, D) for t in self.qkv(x))
        pos = (attention_mask.cumsum(-1) - 1) * attention_mask
        alibi = (alibi_slopes(H)[None, :, None] * pos[:, None, :]).reshape(b * H, 1, n)
        s = alibi.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(D))
        s = s.view(b, H, n, n)
        pad = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        p = F.softmax(s + pad, dim=-1, dtype=torch.float32).view(b * H, n, n)
        return self.o(_merge(torch.bmm(p, v).view(b, H, n, D)))


class SoftCap(Attn):
    """Gemma-2 style logit soft-capping between the scaled scores and a causal additive mask."""

    def __init__(self, cap: float = 5.0):
        super().__init__(kv_heads=2)
        self.cap = cap

    def forward(self, x):
        q, k, v = self.qkv(x)
        k, v = k.repeat_interleave(H // 2, dim=1), v.repeat_interleave(H // 2, dim=1)
        n = x.shape[1]
        s = q @ k.transpose(-1, -2) * 0.3  # a query_pre_attn_scalar-style scale, not 1/sqrt(d)
        s = torch.tanh(s / self.cap) * self.cap
        mask = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        return self.o(_merge((s + mask).softmax(-1) @ v))


class MQAFloatMask(Attn):
    """One key head broadcast in the scores product; a float mask derived from the input is added."""

    def __init__(self):
        super().__init__(kv_heads=1)

    def forward(self, x, attention_mask):
        q, k, v = self.qkv(x)
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + ext
        return self.o(_merge(torch.matmul(s.softmax(-1), v)))


class MistralWindow(Attn):
    """A causal sliding-window mask the model builds itself (Mistral style, triu of a filled matrix)."""

    def __init__(self, window: int = 4):
        super().__init__(kv_heads=2)
        self.window = window

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        k = k[:, :, None].expand(-1, -1, H // 2, -1, -1).reshape(k.shape[0], H, n, D)
        v = v[:, :, None].expand(-1, -1, H // 2, -1, -1).reshape(v.shape[0], H, n, D)
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)
        band = torch.ones(n, n, dtype=torch.bool).tril(-self.window)
        mask = mask.masked_fill(band, torch.finfo(x.dtype).min)
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + mask
        return self.o(_merge(s.softmax(-1) @ v))


class FiniteFill(Attn):
    """Older model code: a padding mask applied with masked_fill(..., -1e9); rows may be fully masked."""

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(keep[:, None, None, :] == 0, -1e9)
        return self.o(_merge(s.softmax(-1) @ v))


class TensorFill(Attn):
    """A plain causal layer whose fill value is a tensor made at run time (finfo.min, detached)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        fill = torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device).detach()
        keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        s = torch.where(keep, s, fill)
        return self.o(_merge(s.softmax(-1) @ v))


class MixedLocalGlobal(nn.Module):
    """Alternating global causal and local (causal band of ``window``) layers, masks by index comparison."""

    def __init__(self, layers: int = 4, window: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Attn() for _ in range(layers))
        self.window = window

    def forward(self, x):
        n = x.shape[1]
        i = torch.arange(n, device=x.device)
        causal = i[None, :] <= i[:, None]
        local = causal & (i[:, None] - i[None, :] < self.window)
        for li, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x)
            s = q @ k.transpose(-1, -2) / math.sqrt(D)
            s = s.masked_fill(~(local if li % 2 else causal), float("-inf"))
            x = x + layer.o(_merge(s.softmax(-1) @ v))
        return x


class Varargs(Attn):
    """forward(*inputs): the model unpacks its own arguments."""

    def forward(self, *inputs, **kwargs):
        x, keep = inputs
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.o(_merge(y)) * kwargs.get("gain", 1.0)


class FlatGQABmm(Attn):
    """GQA expanded before flattening to [B*H] for baddbmm, with a padding mask by masked_fill."""

    def __init__(self):
        super().__init__(kv_heads=2)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x)
        k = k[:, :, None].expand(b, 2, H // 2, n, D).reshape(b * H, n, D)
        v = v[:, :, None].expand(b, 2, H // 2, n, D).reshape(b * H, n, D)
        q = q.reshape(b * H, n, D)
        s = torch.baddbmm(torch.zeros(1, 1, 1), q, k.transpose(1, 2), beta=0.0, alpha=D**-0.5)
        pad = (~keep)[:, None, None, :].expand(b, H, 1, n).reshape(b * H, 1, n)
        s = s.masked_fill(pad, float("-inf"))
        return self.o(_merge(torch.bmm(s.softmax(-1), v).view(b, H, n, D)))


class CrossWhereFull(Attn):
    """Cross-attention with a key padding mask applied by where(pad, s, full_like(s, min))."""

    def forward(self, x, memory, keep):
        q, k, v = self.qkv(x, memory)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        s = torch.where(keep[:, None, None, :], s, torch.full_like(s, torch.finfo(s.dtype).min))
        return self.o(_merge(s.softmax(-1) @ v))


def x_(n: int = N, b: int = B) -> torch.Tensor:
    return torch.randn(b, n, E)


def keep_(n: int = N, b: int = B, fully: bool = False) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[-1, n - 3:] = False
    if fully:
        keep[0] = False
    return keep
