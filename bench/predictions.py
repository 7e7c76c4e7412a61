"""Does the plan's predicted speedup hold? Predicted against measured, per variant and length, on this CPU.

    python bench/predictions.py [--lengths 1024 4096] [--reps 5] [--fresh]

Each case is a model that is one attention site (8 heads, head dim 64, causal, batch 1), spelled as
SDPA or as matmul/softmax/matmul. ``optimize`` pins one variant (``budget=None``); the plan's
``speedup`` column is the cost model's prediction of the site as written over the site as rewritten.
The measured speedup is the original module's time over the optimized module's time (median of
interleaved runs after warm-up), so the two compare the same thing. ``--fresh`` uses an empty profile
cache, so the figures come from the quick calibration a first run makes (what a new user sees).
A case passes when the prediction is within 2x of the measurement either way.
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

CASES = [  # (spelling, variant, params)
    ("sdpa", "dense", {}),
    ("matmul", "dense", {}),
    ("sdpa", "sliding_window", {"window": 256}),
    ("matmul", "sliding_window", {"window": 256}),
    ("sdpa", "sinks_window", {"window": 256, "sinks": 4}),
    ("sdpa", "block_sparse", {"keep": 0.25}),
    ("sdpa", "linear", {"feature_map": "elu1"}),
]


class Attention(torch.nn.Module):
    """One causal self-attention over q, k, v split from one input, written as SDPA or as three ops."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # [B, N, 3·H·D]: one stream (self-attention), no projection to time
        q, k, v = x.view(b, n, 3, 8, -1).permute(2, 0, 3, 1, 4)
        if self.spelling == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        n = q.shape[-2]
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return s.softmax(-1) @ v


def main() -> None:
    """Print predicted and measured speedups for each case and length, and how many are within 2x."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
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
    print(f"CPU profile: {hw.source} ({'measured now' if measured_now else 'cached'}, "
          f"{time.perf_counter() - t0:.1f} s); threads {args.threads}; H=8, D=64, causal, float32, batch 1")
    print(f"{'spelling':>8} {'variant':<34} {'N':>6} {'orig ms':>9} {'opt ms':>9} {'predicted':>9} "
          f"{'measured':>9} {'pred/meas':>9}  within 2x")
    rows = []
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(1, n, 3 * 8 * 64, generator=g)
        for spelling, variant, params in CASES:
            model = Attention(spelling).eval()
            opt = rewriter.optimize(model, (x,), variants={variant: params}, budget=None)
            (d,) = opt.plan.decisions
            if d.variant != variant or d.predicted_speedup is None:
                print(f"{spelling:>8} {variant:<34} {n:>6}  not planned: {d.variant} ({d.reason})")
                continue
            t = time_interleaved({"orig": lambda: model(x), "opt": lambda: opt(x)}, reps=args.reps)
            measured = t["orig"].median / t["opt"].median
            ratio = d.predicted_speedup / measured
            ok = 0.5 <= ratio <= 2.0
            rows.append(ok)
            label = variant + ("(" + ",".join(f"{a}={b}" for a, b in params.items()) + ")" if params else "")
            print(f"{spelling:>8} {label:<34} {n:>6} {t['orig'].median * 1e3:>9.1f} {t['opt'].median * 1e3:>9.1f} "
                  f"{d.predicted_speedup:>8.2f}x {measured:>8.2f}x {ratio:>9.2f}  {'yes' if ok else 'NO'}")
    print(f"within 2x: {sum(rows)} of {len(rows)} cases")


if __name__ == "__main__":
    main()
