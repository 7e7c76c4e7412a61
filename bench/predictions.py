"""Does the plan's predicted speedup hold? Predicted against measured, per variant, shape and spelling, on this CPU.

    python bench/predictions.py [--full] [--reps 5] [--fresh] [--variants dense linear ...]

Each case is a model that is one causal self-attention site (batch 1, float32), spelled as SDPA or as
matmul/softmax/matmul. Shapes: heads H in {4, 8, 16}, head dims D in {32, 64, 128}, lengths N in
{256, 1024, 4096}. By default a Latin square of that grid (9 shapes: at each length every head count
and every head dim once, and every (H, D) pair once); ``--full`` runs all 27. ``optimize`` pins one
variant (``budget=None``); the plan's ``speedup`` column is the cost model's prediction of the site as
written over the site as rewritten. The measured speedup is the original module's time over the
optimized module's (median of interleaved runs after warm-up), so the two compare the same thing.
``--fresh`` uses an empty profile cache, so the figures come from the quick calibration a first run
makes (what a new user sees). A cell passes when the prediction is within 2x of the measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

VARIANTS = [  # (variant, params as a function of the length)
    ("dense", lambda n: {}),
    ("sliding_window", lambda n: {"window": max(32, n // 8)}),
    ("sinks_window", lambda n: {"window": max(32, n // 8), "sinks": 4}),
    ("block_sparse", lambda n: {"keep": 0.25}),
    ("linear", lambda n: {"feature_map": "elu1"}),
]
SPELLINGS = ("sdpa", "matmul")
HEADS, DIMS, LENGTHS = (4, 8, 16), (32, 64, 128), (256, 1024, 4096)


def shapes(full: bool) -> list[tuple[int, int, int]]:
    """(N, H, D) cases: the whole grid, or a Latin square of it (each pair of factors once)."""
    if full:
        return [(n, h, d) for n in LENGTHS for h in HEADS for d in DIMS]
    return [(n, HEADS[j], DIMS[(i + j) % 3]) for i, n in enumerate(LENGTHS) for j in range(3)]


class Attention(torch.nn.Module):
    """One causal self-attention over q, k, v split from one input, written as SDPA or as three ops."""

    def __init__(self, spelling: str, heads: int):
        super().__init__()
        self.spelling, self.heads = spelling, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # [B, N, 3·H·D]: one stream (self-attention), no projection to time
        q, k, v = x.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.spelling == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        n = q.shape[-2]
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return s.softmax(-1) @ v


def main() -> None:
    """Print predicted and measured speedups for each case, and how many are within 2x (and within 4x)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all 27 shapes instead of the Latin square")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS])
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="only these lengths")
    ap.add_argument("--shape", nargs="+", default=None, metavar="N,H,D",
                    help="these shapes instead of the grid (e.g. 384,6,96 3000,16,32)")
    ap.add_argument("--fresh", action="store_true", help="calibrate into an empty profile cache first")
    args = ap.parse_args()
    if args.fresh:
        os.environ["ATTENTION_REWRITER_CACHE"] = tempfile.mkdtemp(prefix="rewriter-profile-")
    torch.set_num_threads(args.threads)

    import rewriter
    from codegen import hw_calibrate
    from rewriter.report import time_interleaved

    t0 = time.perf_counter()
    hw, measured_now = hw_calibrate.ensure_calibrated()
    print(f"CPU profile: {hw.note or hw.source} ({'measured now' if measured_now else 'cached'}, "
          f"{time.perf_counter() - t0:.1f} s); threads {args.threads}; causal, float32, batch 1; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'spelling':>8} {'variant':<30} {'N':>5} {'H':>3} {'D':>4} {'orig ms':>9} {'opt ms':>9} "
          f"{'predicted':>9} {'measured':>9} {'pred/meas':>9}  within 2x")
    rows = []
    grid = [tuple(int(x) for x in t.split(",")) for t in args.shape] if args.shape else shapes(args.full)
    for n, h, d in grid:
        if args.lengths and n not in args.lengths:
            continue
        g = torch.Generator().manual_seed(n * h + d)
        x = torch.randn(1, n, 3 * h * d, generator=g)
        reps = args.reps if n >= 1024 else 3 * args.reps
        for spelling in SPELLINGS:
            model = Attention(spelling, h).eval()
            for variant, make in VARIANTS:
                if variant not in args.variants:
                    continue
                params = make(n)
                opt = rewriter.optimize(model, (x,), variants={variant: params}, budget=None)
                (dec,) = opt.plan.decisions
                label = variant + ("(" + ",".join(f"{a}={b}" for a, b in params.items()) + ")" if params else "")
                if dec.variant != variant or dec.predicted_speedup is None:
                    print(f"{spelling:>8} {label:<30} {n:>5} {h:>3} {d:>4}  not planned: {dec.variant} ({dec.reason})")
                    continue
                with torch.no_grad():
                    t = time_interleaved({"orig": lambda: model(x), "opt": lambda: opt(x)}, reps=reps)
                measured = t["orig"].median / t["opt"].median
                ratio = dec.predicted_speedup / measured
                rows.append(ratio)
                print(f"{spelling:>8} {label:<30} {n:>5} {h:>3} {d:>4} {t['orig'].median * 1e3:>9.2f} "
                      f"{t['opt'].median * 1e3:>9.2f} {dec.predicted_speedup:>8.2f}x {measured:>8.2f}x {ratio:>9.2f}  "
                      f"{'yes' if 0.5 <= ratio <= 2.0 else 'NO'}", flush=True)
    within2 = sum(0.5 <= r <= 2.0 for r in rows)
    beyond4 = sum(not 0.25 <= r <= 4.0 for r in rows)
    worst = max((max(r, 1 / r) for r in rows), default=1.0)
    print(f"within 2x: {within2} of {len(rows)} cells ({100 * within2 / max(1, len(rows)):.0f}%); "
          f"beyond 4x: {beyond4}; "
          f"worst {worst:.2f}x off")


if __name__ == "__main__":
    main()
