"""The project's own small causal language model: a byte-level GPT trained on real English text.

The text is what every Python install carries: the docstrings of the standard library (see
``corpus``). ``examples/train_tiny_lm.py`` trains it; the checkpoint ships in ``rewriter/assets``
and is the CLI's default model and the fixture for perplexity checks.
"""
from __future__ import annotations

import ast
import hashlib
import logging
import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CHECKPOINT = Path(__file__).parent / "assets" / "tiny_lm.pt"


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the byte-level GPT."""

    vocab: int = 256
    context: int = 1024
    dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp: int = 4


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (fused SDPA)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp * cfg.dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Byte-level GPT: learned positions, pre-norm blocks, tied input/output embedding."""

    def __init__(self, cfg: LMConfig = LMConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        for m in self.modules():  # GPT-2 initialisation: tied logits start near uniform
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-byte logits [B, N, 256] for byte ids [B, N] (N <= context)."""
        n = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(n, device=input_ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.tok.weight.t()


def _docstrings(path: str) -> list[str]:
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append(doc.strip())
    return out


def corpus(split: str) -> bytes:
    """English prose from the standard library's docstrings; modules are split 95/5 by a hash of their path."""
    if split not in ("train", "heldout"):
        raise ValueError("split is 'train' or 'heldout'")
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            held = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0
            if held == (split == "heldout"):
                texts.extend(_docstrings(os.path.join(dirpath, name)))
    return "\n\n".join(texts).encode("utf-8", errors="ignore")


def load(path: Optional[Path] = None) -> TinyLM:
    """The trained checkpoint shipped with the project, in float32 and eval mode."""
    path = Path(path or CHECKPOINT)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train it with `python examples/train_tiny_lm.py`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyLM(LMConfig(**blob["config"]))
    model.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return model.eval()


def save(model: TinyLM, path: Path, meta: dict) -> None:
    """Write a half-precision checkpoint (config, weights, training figures)."""
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.cfg), "state": state, "meta": meta}, path)


def windows(data: bytes, length: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` windows of ``length + 1`` bytes at seeded random offsets: [count, length + 1] int64."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    starts = torch.randint(0, len(buf) - length - 1, (count,), generator=g)
    return torch.stack([buf[s:s + length + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def perplexity(model: torch.nn.Module, batch: torch.Tensor, chunk: int = 4) -> float:
    """Per-byte perplexity of ``model`` on [n, L + 1] byte windows (a callable returning logits)."""
    total, count = 0.0, 0
    for i in range(0, batch.shape[0], chunk):
        b = batch[i:i + chunk]
        out = model(b[:, :-1])
        logits = out if isinstance(out, torch.Tensor) else out[0]
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += b[:, 1:].numel()
    return math.exp(total / count)
