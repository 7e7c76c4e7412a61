"""Models written the way popular third-party libraries write attention (regression fixtures, issue 14).

Each class is one feature the finder once missed, refused or crashed on; none is named after the
library it imitates, and none is found by its name. Sizes are awkward on purpose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

B, N, H, D, E = 2, 9, 4, 8, 32
T = 7  # text tokens


def _heads(x: torch.Tensor, h: int = H) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)


def _merge(y: torch.Tensor) -> torch.Tensor:
    b, h, n, d = y.shape
    return y.transpose(1, 2).reshape(b, n, h * d)


class _QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, H * D), nn.Linear(E, H * D), nn.Linear(E, H * D),
                                          nn.Linear(H * D, E))

    def qkv(self, x: torch.Tensor):
        return _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))


@dataclass
class Intermediates:
    """What a configurable attention returns for inspection; the caller drops it."""

    qk_similarities: Optional[torch.Tensor] = None
    pre_softmax_attn: Optional[torch.Tensor] = None
    post_softmax_attn: Optional[torch.Tensor] = None


class Attend(nn.Module):
    """Scores cloned before and after masking and the probabilities after the softmax, for inspection."""

    def forward(self, q, k, v, mask):
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        qk_similarities = sim.clone()
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        pre_softmax_attn = sim.clone()
        attn = sim.softmax(dim=-1)
        post_softmax_attn = attn.clone()
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        return out, Intermediates(qk_similarities, pre_softmax_attn, post_softmax_attn)


class DeadClones(_QKV):
    """A causal decoder layer whose attention keeps clones of its scores that nothing reads."""

    def __init__(self):
        super().__init__()
        self.attend = Attend()

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        out, _ = self.attend(q, k, v, causal)
        return self.o(_merge(out))


class InplaceDropout(_QKV):
    """``nn.Dropout(inplace=True)`` between the softmax and the value product (a no-op in eval)."""

    def __init__(self):
        super().__init__()
        self.attn_drop = nn.Dropout(0.1, inplace=True)

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        attn = (q @ k.transpose(-2, -1)) * D ** -0.5
        attn = attn.masked_fill(~keep[:, None, None, :], float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.o(_merge(attn @ v))


class TransposedValues(_QKV):
    """The value product written the other way round: ``v.mT @ attn.mT``, then transposed back."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        attn = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(dim=-1)
        out = v.transpose(-2, -1) @ attn.transpose(-2, -1)  # [b, h, d, n]
        return self.o(_merge(out.transpose(-2, -1)))


class KeysFirst(_QKV):
    """Scores laid out [keys, queries]: ``k @ q.mT``, softmax over dim -2, ``v.mT @ attn``."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        attn = (k @ q.transpose(-2, -1) / math.sqrt(D)).softmax(dim=-2)  # [b, h, keys, queries]
        out = v.transpose(-2, -1) @ attn  # [b, h, d, queries]
        return self.o(_merge(out.transpose(-2, -1)))


class CosineAttention(_QKV):
    """Normalised q and k, a learned per-head logit scale, then a relative position bias (window style)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(H, 1, 1) + 1))
        self.rel_bias = nn.Parameter(torch.randn(H, N, N) * 0.5)

    def forward(self, x):
        q, k, v = self.qkv(x)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        attn = attn + self.rel_bias[:, : x.shape[1], : x.shape[1]]
        return self.o(_merge(attn.softmax(dim=-1) @ v))


class SliceBiasWrite(_QKV):
    """A position bias written into the scores by in-place slice assignment (the class token left out),
    and the padded keys hidden by in-place writes as well."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(H, N - 1, N - 1) * 0.5)

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        attn = q @ k.transpose(-2, -1) * D ** -0.5
        attn[:, :, 1:, 1:] += self.rel
        attn.masked_fill_(~keep[:, None, None, :], float("-inf"))
        return self.o(_merge(attn.softmax(dim=-1) @ v))


class IndexedMaskWrite(_QKV):
    """Hidden positions written by boolean indexing: ``attn[~mask] = -inf`` (and a region filled)."""

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        attn = q @ k.transpose(-2, -1) * D ** -0.5
        hide = ~keep[:, None, None, :].expand_as(attn)
        attn[hide] = float("-inf")
        attn[:, :, 0, 1:] = float("-inf")  # the first query sees only the first key
        return self.o(_merge(attn.softmax(dim=-1) @ v))


class PerSampleText(nn.Module):
    """Image tokens cross-attend per sample to that sample's unpadded text (its length read from the mask)."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(E, H * D), nn.Linear(E, 2 * H * D), nn.Linear(H * D, E)

    def forward(self, x, text, text_mask):
        b, n, _ = x.shape
        q = _heads(self.q(x))
        k, v = self.kv(text).view(b, text.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)
        lengths = text_mask.sum(-1)
        outs = []
        for i in range(b):
            length = lengths[i].item()
            torch._check(length >= 1)
            torch._check(length <= text.shape[1])
            outs.append(F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, :length], v[i:i + 1, :, :length]))
        return self.o(_merge(torch.cat(outs)))


class PerSampleSelf(nn.Module):
    """Self-attention per sample over its unpadded tokens, written into a zero-initialised output."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(E, 3 * H * D), nn.Linear(H * D, E)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        y = torch.zeros_like(q)
        lengths = keep.sum(-1)
        for i in range(b):
            length = lengths[i].item()
            torch._check(length >= 1)
            torch._check(length <= n)
            qi, ki, vi = q[i:i + 1, :, :length], k[i:i + 1, :, :length], v[i:i + 1, :, :length]
            attn = (qi @ ki.transpose(-2, -1) / math.sqrt(D)).softmax(-1)
            y[i:i + 1, :, :length] = attn @ vi
        return self.o(_merge(y))


class Unexportable(_QKV):
    """Attention followed by Python control flow on a tensor's value: torch.export cannot capture it."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        y = self.o(_merge(((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(-1) @ v))
        if y.abs().amax() > 100.0:  # a data-dependent branch
            y = y / 100.0
        return y


# ----------------------------------------------------------------------------- vision transformers

IMG, PATCH, VD, VH = 20, 4, 32, 2  # a 5 x 5 patch grid


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(VD)
        self.qkv, self.proj = nn.Linear(VD, 3 * VD), nn.Linear(VD, VD)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, VH, VD // VH).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, VD))


class RegisterViT(nn.Module):
    """Register tokens, and a position embedding added to the patches before class and registers are joined."""

    def __init__(self, registers: int = 3, layers: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, VD, PATCH, stride=PATCH)
        g = IMG // PATCH
        self.pos = nn.Parameter(torch.randn(1, g * g, VD) * 0.1)
        self.cls = nn.Parameter(torch.randn(1, 1, VD))
        self.reg = nn.Parameter(torch.randn(1, registers, VD))
        self.blocks = nn.ModuleList(_Block() for _ in range(layers))
        self.registers = registers

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = x + self.pos
        b = x.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), self.reg.expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


class DynamicSizeViT(nn.Module):
    """Patches kept NHWC, the position embedding resampled (interpolated) to the grid, then flattened."""

    def __init__(self, layers: int = 2, trained_grid: int = 7):
        super().__init__()
        self.patch = nn.Conv2d(3, VD, PATCH, stride=PATCH)
        self.pos = nn.Parameter(torch.randn(1, trained_grid * trained_grid, VD) * 0.1)
        self.cls = nn.Parameter(torch.randn(1, 1, VD))
        self.blocks = nn.ModuleList(_Block() for _ in range(layers))
        self.trained_grid = trained_grid

    def forward(self, pixels):
        x = self.patch(pixels).permute(0, 2, 3, 1)  # [B, rows, cols, C]
        b, rows, cols, c = x.shape
        g = self.trained_grid
        pos = self.pos.reshape(1, g, g, c).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(rows, cols), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        x = (x + pos).reshape(b, rows * cols, c)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


class ResampledPatchViT(nn.Module):
    """The patch embedding's output resampled to another grid (bilinear) before it becomes tokens;
    the convolution's kernel is itself resampled from a larger stored one."""

    def __init__(self, layers: int = 2, stored_patch: int = 6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VD, 3, stored_patch, stored_patch) * 0.1)
        self.bias = nn.Parameter(torch.zeros(VD))
        self.cls = nn.Parameter(torch.randn(1, 1, VD))
        self.blocks = nn.ModuleList(_Block() for _ in range(layers))

    def forward(self, pixels):
        w = F.interpolate(self.weight, size=(PATCH, PATCH), mode="bilinear", align_corners=False)
        x = F.conv2d(pixels, w, self.bias, stride=PATCH)  # [B, C, 5, 5]
        x = F.interpolate(x, size=(6, 4), mode="bilinear", align_corners=False)  # a 6 x 4 grid
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


def x_(n: int = N, b: int = B) -> torch.Tensor:
    return torch.randn(b, n, E)


def keep_(n: int = N, b: int = B, pad: int = 3) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[-1, n - pad:] = False
    return keep


def text_mask_(b: int = B, t: int = T, pad: int = 3) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - pad:] = 0
    return mask


def pixels_(b: int = B) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG)
