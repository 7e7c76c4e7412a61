"""The project's second small causal LM: Llama-shaped, with rotary embeddings and grouped-query attention.

It is written the way Llama implementations write it (RMSNorm, SwiGLU, ``rotate_half`` rotary with the
cos and sin computed from the positions in the forward, K/V heads repeated to the query heads, fused
SDPA), so that the variants that matter on current LLMs (rotary latent, per-head windows, dynamic sparse
prefill) are judged on real attention patterns at a 2048-byte context. It reads the same byte-level text
as ``rewriter.lm``; ``examples/train_tiny_lm.py --arch llama`` trains it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT = Path(__file__).parent / "assets" / "rope_lm.pt"


@dataclass(frozen=True)
class RopeLMConfig:
    """Sizes of the Llama-shaped byte-level LM."""

    vocab: int = 256
    context: int = 2048
    dim: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 704
    theta: float = 10000.0


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(cfg: RopeLMConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, head_dim] for integer positions [N]."""
    hd = cfg.dim // cfg.heads
    inv = 1.0 / (cfg.theta ** (torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    """Causal grouped-query attention with rotary q and k."""

    def __init__(self, cfg: RopeLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, n, self.hd).reshape(b, self.heads, n, self.hd)
        v = v[:, :, None].expand(b, self.kv_heads, rep, n, self.hd).reshape(b, self.heads, n, self.hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, self.heads * self.hd))


class Block(nn.Module):
    """Pre-norm Llama block: attention, then a SwiGLU MLP."""

    def __init__(self, cfg: RopeLMConfig):
        super().__init__()
        self.input_norm, self.post_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.gate = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class RopeLM(nn.Module):
    """Byte-level Llama: rotary positions, GQA, RMSNorm, SwiGLU, untied output head."""

    def __init__(self, cfg: RopeLMConfig = RopeLMConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-byte logits [B, N, 256] for byte ids [B, N] (N <= context)."""
        n = input_ids.shape[1]
        cos, sin = rotary(self.cfg, torch.arange(n, device=input_ids.device))
        x = self.tok(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.norm(x))


def load(path: Optional[Path] = None) -> RopeLM:
    """The trained checkpoint shipped with the project, in float32 and eval mode."""
    path = Path(path or CHECKPOINT)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train it with `python examples/train_tiny_lm.py --arch llama`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = RopeLM(RopeLMConfig(**blob["config"]))
    model.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return model.eval()


def save(model: RopeLM, path: Path, meta: dict) -> None:
    """Write a half-precision checkpoint (config, weights, training figures)."""
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.cfg), "state": state, "meta": meta}, path)
