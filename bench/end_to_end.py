"""A 6-layer GPT-shaped model (d=512, 8 heads, causal, random weights): original vs rewritten, one run.

    python bench/end_to_end.py                      # sliding_window(512) at N=16384, dense at N=2048
    python bench/end_to_end.py --n 4096 --reps 2

The rewritten model is ``rewriter.optimize(model, x, variants={...}, budget=None)``; original and
rewritten forwards are interleaved and the median is reported with the ratio from the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rewriter  # noqa: E402


class Block(nn.Module):
    """Pre-norm transformer block with causal SDPA attention and a 4x GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Embedding-free GPT trunk: input [B, N, d] activations."""

    def __init__(self, layers: int = 6, d: int = 512, heads: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


def compare(model: nn.Module, n: int, variants: dict, reps: int) -> None:
    """Print original vs rewritten times at length n."""
    x = torch.randn(1, n, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t0 = time.perf_counter()
        opt = rewriter.optimize(model, x, variants=variants, budget=None)
        build = time.perf_counter() - t0
        ref, out = model(x), opt(x)  # warm-up (and the C++ kernel build on first use)
        err = float((out - ref).norm() / ref.norm())
        times = {"original": [], "rewritten": []}
        for _ in range(reps):
            for name, fn in (("original", model), ("rewritten", opt)):
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["original"]), statistics.median(times["rewritten"])
    name = ",".join(f"{k}{v or ''}" for k, v in variants.items())
    print(f"| {n} | {name} | {a:.2f} | {b:.2f} | {a / b:.2f} | {err:.2e} | {build:.1f} |", flush=True)


def main() -> None:
    """Run the end-to-end comparison and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384, help="length for the sliding-window rewrite")
    ap.add_argument("--dense-n", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT().eval()
    print(f"GPT 6 layers, d=512, 8 heads, causal, random weights, batch 1, threads {torch.get_num_threads()}, "
          f"median of {args.reps} interleaved runs (shared machine: read the ratio)")
    print("| N | variant | original s | rewritten s | speedup | rel L2 vs original | optimize s |")
    print("|---|---|---|---|---|---|---|")
    compare(model, args.dense_n, {"dense": None}, args.reps)
    compare(model, args.n, {"sliding_window": {"window": args.window}}, args.reps)


if __name__ == "__main__":
    main()
