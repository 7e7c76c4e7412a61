"""Hand-written modules, one per way of spelling attention, each with the flags its site must carry."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

B, N, M, H, D, E = 2, 7, 11, 4, 8, 32  # awkward sizes: N and M are not multiples of anything


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, tuple]]
    expect: list[dict] = field(default_factory=list)  # one dict of expected site fields per site


def _heads(x: torch.Tensor, h: int = H) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)


def _merge(y: torch.Tensor) -> torch.Tensor:
    b, h, n, d = y.shape
    return y.transpose(1, 2).reshape(b, n, h * d)


class Proj(nn.Module):
    """q/k/v/o projections shared by the spellings below."""

    def __init__(self, kv_heads: int = H):
        super().__init__()
        self.q = nn.Linear(E, H * D)
        self.k = nn.Linear(E, kv_heads * D)
        self.v = nn.Linear(E, kv_heads * D)
        self.o = nn.Linear(H * D, E)
        self.kv_heads = kv_heads

    def qkv(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        return _heads(self.q(x)), _heads(self.k(ctx), self.kv_heads), _heads(self.v(ctx), self.kv_heads)


class MatmulDiv(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
        return self.o(_merge(torch.softmax(s, dim=-1) @ v))


class MatmulMulAdditive(Proj):
    def forward(self, x, mask):
        q, k, v = self.qkv(x)
        s = (q @ k.transpose(2, 3)) * D**-0.5 + mask
        return self.o(_merge(F.softmax(s, -1) @ v))


class ScaleBoth(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        q, k = q * D**-0.25, k * D**-0.25
        return self.o(_merge((q @ k.transpose(-1, -2)).softmax(-1) @ v))


class BmmScaleQ(Proj):
    def forward(self, x):
        b = x.shape[0]
        q, k, v = (t.reshape(b * H, N, D) for t in self.qkv(x))
        q = q * (1.0 / math.sqrt(D))
        p = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
        y = torch.bmm(p, v).view(b, H, N, D)
        return self.o(_merge(y))


class EinsumBHQD(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
        return self.o(_merge(torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)))


class EinsumBQHD(nn.Module):
    """Heads kept in the third dim; the output einsum writes straight into [b, q, h, d]."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * H * D)
        self.o = nn.Linear(H * D, E)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).unbind(2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5
        y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
        return self.o(y.reshape(b, n, H * D))


class BaddbmmBias(Proj):
    def forward(self, x, bias):
        b = x.shape[0]
        q, k, v = (t.reshape(b * H, N, D) for t in self.qkv(x))
        s = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=D**-0.5)
        y = torch.bmm(s.softmax(-1), v).view(b, H, N, D)
        return self.o(_merge(y))


class WhereTrilCausal(Proj):
    def __init__(self):
        super().__init__()
        self.register_buffer("tri", torch.tril(torch.ones(64, 64, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = torch.where(self.tri[:n, :n], s, torch.finfo(s.dtype).min)
        return self.o(_merge(s.softmax(-1) @ v))


class MaskedFillTriu(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(future, float("-inf"))
        return self.o(_merge(s.softmax(-1) @ v))


class IndexCompareCausal(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        i = torch.arange(x.shape[1])
        keep = i[:, None] >= i[None, :]
        bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        s = q @ k.transpose(-1, -2) * D**-0.5 + bias
        return self.o(_merge(s.softmax(-1) @ v))


class PaddingBoolFloat32Dropout(Proj):
    """Key padding mask, softmax in float32 and cast back, dropout on the probabilities."""

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        p = F.softmax(s.float(), dim=-1).type_as(q)
        p = F.dropout(p, p=0.1, training=self.training)
        return self.o(_merge(p @ v))


class RepeatKV(Proj):
    def __init__(self):
        super().__init__(kv_heads=2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        b, g, n, d = k.shape
        k = k[:, :, None].expand(b, g, H // g, n, d).reshape(b, H, n, d)
        v = v[:, :, None].expand(b, g, H // g, n, d).reshape(b, H, n, d)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, float("-inf"))
        return self.o(_merge(s.softmax(-1) @ v))


class SdpaGQA(Proj):
    def __init__(self):
        super().__init__(kv_heads=2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        return self.o(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))


class SdpaBoolMask(Proj):
    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.o(_merge(y))


class SdpaFloatMaskScale(Proj):
    def forward(self, x, bias):
        q, k, v = self.qkv(x)
        return self.o(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)))


class MQABroadcast(Proj):
    def __init__(self):
        super().__init__(kv_heads=1)

    def forward(self, x):
        q, k, v = self.qkv(x)  # k, v: [b, 1, n, d], broadcast over the heads by matmul
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        return self.o(_merge(s.softmax(-1) @ v))


class CrossAttention(Proj):
    def forward(self, x, memory):
        q, k, v = self.qkv(x, memory)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        return self.o(_merge(s.softmax(-1) @ v))


class LearnedQuery(nn.Module):
    """Attention pooling: a learned query attends over the sequence."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, H, 3, D))
        self.k = nn.Linear(E, H * D)
        self.v = nn.Linear(E, H * D)

    def forward(self, x):
        k, v = _heads(self.k(x)), _heads(self.v(x))
        s = self.query @ k.transpose(-1, -2) / math.sqrt(D)
        return (s.softmax(-1) @ v).flatten(1)


class NotAttention(nn.Module):
    """A classifier head and a router: softmax then a product with weights, never attention."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Linear(E, 5)
        self.table = nn.Parameter(torch.randn(5, E))
        self.router = nn.Linear(E, 3)
        self.experts = nn.Parameter(torch.randn(3, E, E))

    def forward(self, x):
        probs = self.cls(x).softmax(-1)
        pooled = probs @ self.table  # pooling over weights
        gate = self.router(x).softmax(-1)  # [b, n, 3]
        mixed = torch.einsum("bne,bnx,xef->bnf", gate.new_ones(gate.shape[:2] + (E,)), gate, self.experts)
        return pooled + mixed


class MHA(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, pad):
        y, _ = self.mha(x, x, x, key_padding_mask=pad, need_weights=self.need_weights)
        return y


class MHACross(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, kdim=E, vdim=E)

    def forward(self, x, memory):
        return self.mha(x, memory, memory, need_weights=False)[0]


def _x(n=N):
    return torch.randn(B, n, E)


def _keep():
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -3:] = False
    return keep


def _self(**kw):
    base = dict(causal=False, is_cross=False, num_heads=H, num_kv_heads=H, head_dim=D,
                q_len=N, kv_len=N, mask_kind="none", batch=B)
    base.update(kw)
    return base


CASES = [
    Case("matmul_div", lambda: (MatmulDiv(), (_x(),)), [_self()]),
    Case("matmul_mul_additive", lambda: (MatmulMulAdditive(), (_x(), torch.randn(B, 1, N, N))),
         [_self(mask_kind="additive")]),
    Case("scale_q_and_k", lambda: (ScaleBoth(), (_x(),)), [_self()]),
    Case("bmm_scale_q", lambda: (BmmScaleQ(), (_x(),)), [_self()]),
    Case("einsum_bhqd", lambda: (EinsumBHQD(), (_x(),)), [_self()]),
    Case("einsum_bqhd", lambda: (EinsumBQHD(), (_x(),)), [_self()]),
    Case("baddbmm_bias", lambda: (BaddbmmBias(), (_x(), torch.randn(B * H, N, N))), [_self(mask_kind="additive")]),
    Case("where_tril_causal", lambda: (WhereTrilCausal(), (_x(),)), [_self(causal=True, mask_kind="causal")]),
    Case("masked_fill_triu", lambda: (MaskedFillTriu(), (_x(),)), [_self(causal=True, mask_kind="causal")]),
    Case("index_compare_causal", lambda: (IndexCompareCausal(), (_x(),)), [_self(causal=True, mask_kind="causal")]),
    Case("padding_f32_dropout", lambda: (PaddingBoolFloat32Dropout(), (_x(), _keep())), [_self(mask_kind="padding")]),
    Case("repeat_kv_gqa", lambda: (RepeatKV(), (_x(),)), [_self(num_kv_heads=2, causal=True, mask_kind="causal")]),
    Case("sdpa_enable_gqa", lambda: (SdpaGQA(), (_x(),)), [_self(num_kv_heads=2, causal=True, mask_kind="causal")]),
    Case("sdpa_bool_padding", lambda: (SdpaBoolMask(), (_x(), _keep())), [_self(mask_kind="padding")]),
    Case("sdpa_float_mask_scale", lambda: (SdpaFloatMaskScale(), (_x(), torch.randn(B, H, N, N))),
         [_self(mask_kind="additive")]),
    Case("mqa_broadcast", lambda: (MQABroadcast(), (_x(),)), [_self(num_kv_heads=1)]),
    Case("cross", lambda: (CrossAttention(), (_x(), _x(M))), [_self(is_cross=True, kv_len=M)]),
    Case("learned_query", lambda: (LearnedQuery(), (_x(),)), [_self(is_cross=True, q_len=3)]),
    Case("not_attention", lambda: (NotAttention(), (_x(),)), []),
    Case("mha_need_weights", lambda: (MHA(True), (_x(), ~_keep())), [_self(mask_kind="padding")]),
    Case("mha_no_weights", lambda: (MHA(False), (_x(), ~_keep())), [_self(mask_kind="padding")]),
    Case("mha_cross_seq_first", lambda: (MHACross(), (torch.randn(N, B, E), torch.randn(M, B, E))),
         [_self(is_cross=True, kv_len=M)]),
]
