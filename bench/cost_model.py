"""Grid benchmark of the cost model on this CPU: predicted against measured attention times.

Every variant's CPU implementation (SDPA for dense; the plain-PyTorch reference math for the
others) x N in {512, ..., 16384} x head dim in {64, 128}, causal self-attention, B=1, H=G=4.
Prints a table, then last the Spearman rank correlation between predicted and measured
times over the whole grid, and the share of grid points where the variant predicted
fastest measures within 10% of the measured fastest.

    python bench/cost_model.py            # full grid (several minutes on 2 cores)
    python bench/cost_model.py --quick    # N in {512, 2048}, d = 64
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from codegen.hw_calibrate import calibrate, wait_quiet  # noqa: E402
from cost_model.predict import predict  # noqa: E402

B, H, G = 1, 4, 4


def variants(d: int) -> dict[str, dict]:
    """Variant name -> parameters used on the grid (one fixed setting each)."""
    return {
        "dense": {},
        "sliding_window": {"window": 256, "block": 64},
        "sinks_window": {"window": 256, "sinks": 4, "block": 64},
        "block_sparse": {"block": 64, "keep": 0.125},
        "linear": {"chunk": 64},
        "latent": {"rank": d // 4},
    }


def implementation(name: str, params: dict, q, k, v, causal: bool) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running the variant's CPU implementation on (q, k, v)."""
    scale = q.shape[-1] ** -0.5
    if name == "dense":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if name == "latent":
        # the factors are made once at rewrite time; the run-time work is attention on them
        mod = importlib.import_module(f"passes.variants.{name}")
        fac = mod.factors(k, v, params["rank"])
        return lambda: mod.attend(q, *fac, scale=scale, causal=causal)
    import codegen
    return lambda: codegen.run(name, q, k, v, None, scale, causal, **params)


def measure_round_robin(fns: dict[str, Callable[[], object]], budget_s: float = 3.0, min_rounds: int = 3,
                        max_rounds: int = 10) -> dict[str, float]:
    """Best-of-n wall time per callable, running them in interleaved rounds so that noise from
    other processes falls on every variant alike; the minimum filters it."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {k: min(v) for k, v in times.items()}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (scipy if installed, else ranks with ties averaged)."""
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(xs, ys).statistic)
    except ImportError:
        def ranks(v: list[float]) -> list[float]:
            order = sorted(range(len(v)), key=v.__getitem__)
            r = [0.0] * len(v)
            i = 0
            while i < len(order):
                j = i
                while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                    j += 1
                for t in range(i, j + 1):
                    r[order[t]] = (i + j) / 2
                i = j + 1
            return r

        rx, ry = ranks(xs), ranks(ys)
        mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
        cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
        return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def main(argv: list[str] | None = None) -> int:
    """Run the grid and print the table and the two figures of merit."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid: N in {512, 2048}, d = 64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recalibrate", action="store_true", help="re-measure the CPU profile first")
    ap.add_argument("--non-causal", action="store_true", help="bench non-causal attention instead")
    ap.add_argument("--json", type=Path, default=None, help="also write every grid point here")
    ap.add_argument("--wait-quiet", type=float, default=10.0,
                    help="before each grid point wait up to this many seconds for other processes to go idle")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    causal = not args.non_causal
    hw = calibrate(force=args.recalibrate, threads=args.threads)
    print(f"# hardware: {hw.name} ({hw.source})")
    print(f"#   mac/s {hw.mac_per_s:.3g}  exp/s {hw.exp_per_s:.3g}  other/s {hw.other_per_s:.3g}  "
          f"read B/s {hw.read_bytes_per_s:.3g}  write B/s {hw.write_bytes_per_s:.3g}  call {hw.launch_s * 1e6:.1f} us")
    ns = [512, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    ds = [64] if args.quick else [64, 128]
    rows = []
    print(f"# B={B} H={H} G={G} causal={causal} threads={args.threads}")
    print(f"{'N':>6} {'d':>4} {'variant':<15} {'measured ms':>12} {'predicted ms':>13} {'pred/meas':>9}")
    for d in ds:
        for n in ns:
            gen = torch.Generator().manual_seed(n + d)
            q = torch.randn(B, H, n, d, generator=gen)
            k = torch.randn(B, G, n, d, generator=gen)
            v = torch.randn(B, G, n, d, generator=gen)
            shape = dict(B=B, H=H, G=G, P=n, M=n, E=d, F=d)
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            vs = variants(d)
            fns = {name: implementation(name, params, q, k, v, causal) for name, params in vs.items()}
            measured = measure_round_robin(fns)
            for name, params in vs.items():
                meas = measured[name]
                pred = predict(name, shape, hw, causal=causal, **params).seconds
                rows.append(dict(n=n, d=d, variant=name, params=params, measured=meas, predicted=pred))
                print(f"{n:>6} {d:>4} {name:<15} {meas * 1e3:>12.2f} {pred * 1e3:>13.2f} {pred / meas:>9.2f}",
                      flush=True)
            del fns
    points = sorted({(r["n"], r["d"]) for r in rows})
    hits = 0
    print("\n# per grid point: predicted fastest vs measured fastest")
    for n, d in points:
        at = [r for r in rows if r["n"] == n and r["d"] == d]
        best_m = min(at, key=lambda r: r["measured"])
        best_p = min(at, key=lambda r: r["predicted"])
        ok = best_p["measured"] <= 1.10 * best_m["measured"]
        hits += ok
        print(f"N={n:>6} d={d:>4}  predicted {best_p['variant']:<15} measured {best_m['variant']:<15} "
              f"{'ok' if ok else 'MISS'} ({best_p['measured'] / best_m['measured']:.2f}x)")
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    if args.json:
        args.json.write_text(json.dumps(dict(hardware=hw.name, rows=rows), indent=2))
    print(f"\nspearman(predicted, measured) over {len(rows)} runs: {rho:.3f}  (target >= 0.9)")
    print(f"top-1 within 10%: {hits}/{len(points)} = {100 * hits / len(points):.0f}%  (target >= 90%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
