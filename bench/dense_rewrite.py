"""The exact rewrite is never slower than doing nothing: eager, optimize, Inductor and the rewriter backend.

    python bench/dense_rewrite.py [--quick] [--threads 2]

Models (random weights, float32): a 6-layer bidirectional encoder (d=384, 6 heads: the size of a small
sentence-embedding model) and a 6-layer causal GPT (d=512, 8 heads), each written with SDPA and with
matmul/softmax/matmul. Per cell, one forward of each of:
  eager       the model as written
  optimize    rewriter.optimize(model, x, variants=["dense"]) (no compiler)
  inductor    torch.compile(model) (Inductor)
  backend     torch.compile(model, backend="rewriter")
timed as interleaved pairs (eager with optimize, Inductor with the backend; one of each per round, each
pair in a fresh process, the order cycling every round), as the median of 24 rounds below 1024 tokens
and 12 from there. Each pair also times its baseline against itself (A/A): that ratio shows how far
this machine's noise alone moves a ratio from 1.00.
The columns to read are the ratios: optimize/eager and backend/Inductor, each the median of the
per-round paired ratios (>= 1.00 means ours is at least as fast). ``--quick`` runs the SDPA encoder at
128 tokens and the SDPA GPT at 1024 only.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rewriter  # noqa: E402


class Block(nn.Module):
    """Pre-norm transformer block; attention written as SDPA or as matmul/softmax/matmul."""

    def __init__(self, d: int, heads: int, causal: bool, spelling: str):
        super().__init__()
        self.heads, self.causal, self.spelling = heads, causal, spelling
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if self.causal:
            n = q.shape[-2]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return s.softmax(-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Trunk(nn.Module):
    """A stack of blocks over [B, N, d] activations."""

    def __init__(self, layers: int, d: int, heads: int, causal: bool, spelling: str):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, causal, spelling) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


MODELS = {"encoder": dict(layers=6, d=384, heads=6, causal=False), "gpt": dict(layers=6, d=512, heads=8, causal=True)}
ROUNDS = (24, 12)  # below 1024 tokens, from there: multiples of the 6 orders of three
CELLS = [("encoder", 128), ("encoder", 384), ("gpt", 1024), ("gpt", 2048)]


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per callable, and median per-round ratios, over ``rounds`` interleaved rounds.

    ``fns`` holds the baseline, ours and a control (the baseline again). Every round runs each once,
    in an order that cycles through all permutations, so a drift in the machine's speed or the cost of
    coming first falls on all alike. ``ratio`` is the median of the per-round ratios of the baseline's
    time to ours; ``control`` is the same for the baseline against itself (an A/A test): how far from
    1.00 a ratio strays on this machine when both sides run the same code.
    """
    names = list(fns)
    orders = list(itertools.permutations(names))
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(2):
            for fn in fns.values():
                fn()
        for r in range(rounds):
            for k in orders[r % len(orders)]:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    base, ours, control = names
    out = {k: statistics.median(v) for k, v in times.items() if k != control}
    out["ratio"] = statistics.median(a / b for a, b in zip(times[base], times[ours]))
    out["control"] = statistics.median(a / b for a, b in zip(times[base], times[control]))
    return out


def run_pair(name: str, spelling: str, b: int, n: int, pair: str, threads: int) -> dict[str, float]:
    """Medians of one interleaved pair (``eager`` against ``optimize``, or ``inductor`` against ``backend``)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Trunk(**MODELS[name], spelling=spelling).eval()
    x = torch.randn(b, n, MODELS[name]["d"], generator=torch.Generator().manual_seed(n))
    if pair == "eager":
        opt = rewriter.optimize(model, (x,), variants=["dense"], budget=None)
        fns = {"eager": lambda: model(x), "optimize": lambda: opt(x), "eager again": lambda: model(x)}
    else:
        ind = torch.compile(model)
        twin = Trunk(**MODELS[name], spelling=spelling).eval()
        twin.load_state_dict(model.state_dict())
        rw = torch.compile(twin, backend="rewriter")
        fns = {"inductor": lambda: ind(x), "backend": lambda: rw(x), "inductor again": lambda: ind(x)}
    return interleaved(fns, rounds=ROUNDS[n >= 1024])


def main() -> None:
    """Print the table: each pair is timed in a fresh process of its own.

    Eager and compiled code must not share a process while timed: Inductor's kernels bring their own
    OpenMP thread pool, whose spinning threads take the cores from eager ops run right after them.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spellings", default="sdpa,matmul")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--pair", default=None, help=argparse.SUPPRESS)  # internal: name,spelling,b,n,pair
    args = ap.parse_args()
    if args.pair:
        name, spelling, b, n, pair = args.pair.split(",")
        print(json.dumps(run_pair(name, spelling, int(b), int(n), pair, args.threads)))
        return
    cells = [("encoder", 128), ("gpt", 1024)] if args.quick else CELLS
    spellings = ["sdpa"] if args.quick else args.spellings.split(",")
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    print(f"threads {args.threads}, float32, random weights; load {os.getloadavg()[0]:.2f}; medians of "
          f"{ROUNDS[0]} interleaved rounds below 1024 tokens, {ROUNDS[1]} from there (orders cycling); ratios are "
          "medians of per-round paired ratios; A/A = the baseline against itself; each pair in a fresh process")
    print(f"{'model':>8} {'spelling':>8} {'B':>2} {'N':>5} {'eager ms':>9} {'optimize':>9} {'inductor':>9} "
          f"{'backend':>9}  {'opt/eager':>9} {'A/A':>5} {'backend/ind':>11} {'A/A':>5}")
    worst, noise = [math.inf, math.inf], 0.0
    for spelling in spellings:
        for name, n in cells:
            for b in batches:
                t: dict[str, float] = {}
                for pair in ("eager", "inductor"):
                    cmd = [sys.executable, __file__, "--threads", str(args.threads),
                           "--pair", f"{name},{spelling},{b},{n},{pair}"]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    got = json.loads(out.strip().splitlines()[-1])
                    t[f"ratio_{pair}"], t[f"aa_{pair}"] = got.pop("ratio"), got.pop("control")
                    t.update(got)
                r1, r2 = t["ratio_eager"], t["ratio_inductor"]
                worst = [min(worst[0], r1), min(worst[1], r2)]
                noise = max(noise, abs(1 - t["aa_eager"]), abs(1 - t["aa_inductor"]))
                print(f"{name:>8} {spelling:>8} {b:>2} {n:>5} {1e3 * t['eager']:>9.2f} {1e3 * t['optimize']:>9.2f} "
                      f"{1e3 * t['inductor']:>9.2f} {1e3 * t['backend']:>9.2f}  {r1:>8.2f}x {t['aa_eager']:>5.2f} "
                      f"{r2:>10.2f}x {t['aa_inductor']:>5.2f}", flush=True)
    print(f"worst optimize/eager {worst[0]:.2f}x, worst backend/Inductor {worst[1]:.2f}x; "
          f"the A/A controls strayed up to {noise:.2f} from 1.00")


if __name__ == "__main__":
    main()
