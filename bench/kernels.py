"""Time each variant's kernel against SDPA and compiled FlexAttention (same mask) in one run.

    python bench/kernels.py                       # N in {1k,4k,16k}, D in {64,128}, H=8, causal
    python bench/kernels.py --n 16384 --d 64 --variants dense sliding_window linear

Runs are interleaved (ours, SDPA, Flex, ours, ...) and the median of --repeat is reported, so the
ratios compare runs taken under the same load.  On CUDA the same table times the generated
kernels in float16; on CPU the CPU lowering in float32.  FLOP/s counts useful work: 4·D per
visible (query, key) pair for softmax variants, the chunked algorithm's matmuls for linear.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import codegen  # noqa: E402
from codegen.pattern import intervals  # noqa: E402
from codegen.sparse import freeze_params  # noqa: E402

WINDOW, SINKS = 256, 4
HEADS = 8  # --heads; per_head's lists have one entry per head


def variant_params(name: str, n: int) -> dict:
    """Benchmark parameters of each variant (an image-like square grid for neighborhood_2d)."""
    side = int(n ** 0.5)
    return {
        "dense": {},
        "sliding_window": {"window": WINDOW},
        "sinks_window": {"window": WINDOW, "sinks": SINKS},
        "neighborhood_2d": {"grid": [side, n // side], "kernel": [13, 13], "prefix": 0},
        "block_sparse": {"keep": 0.1, "block": 64},
        "linear": {"feature_map": "elu1", "chunk": 64},
        # about 10% of the keys: half columns, half slash bands of 64 keys, from the last 64 queries
        "vertical_slash": {"vertical": n // 20, "slash": max(1, n // 20 // 64), "last_q": 64, "block": 64},
        # the antidiagonal estimator: blocks up to 90% of the estimated mass, at most the top-k row's 10%
        "block_sparse_tau": {"keep": 0.1, "block": 64, "tau": 0.9, "stride": 8},
        # DuoAttention style: the first half of the heads dense, the rest sinks + window
        "per_head": {"window": [0] * (HEADS // 2) + [WINDOW] * (HEADS - HEADS // 2),
                     "sinks": [0] * (HEADS // 2) + [SINKS] * (HEADS - HEADS // 2)},
    }[name]


# rows that time another setting of a variant's kernel
KERNEL = {"block_sparse_tau": "block_sparse"}


def flex_mask_mod(name: str, params: dict, n: int):
    """The FlexAttention mask_mod equal to the variant's pattern (None: no Flex peer)."""
    if name == "dense":
        return lambda b, h, i, j: j <= i
    if name == "sliding_window":
        w = params["window"]
        return lambda b, h, i, j: (j <= i) & (i - j < w)
    if name == "sinks_window":
        w, s = params["window"], params["sinks"]
        return lambda b, h, i, j: (j <= i) & ((i - j < w) | (j < s))
    if name == "neighborhood_2d":
        rows, cols = params["grid"]
        kh, kw = params["kernel"]

        def nb(b, h, i, j):
            ri, ci, rj, cj = i // cols, i % cols, j // cols, j % cols
            r0 = (ri - kh // 2).clamp(0, rows - kh)
            c0 = (ci - kw // 2).clamp(0, cols - kw)
            return (rj >= r0) & (rj < r0 + kh) & (cj >= c0) & (cj < c0 + kw) & (j <= i)
        return nb
    if name == "per_head":
        dense_heads = sum(1 for w in params["window"] if w == 0)
        w, s = max(params["window"]), max(params["sinks"])
        return lambda b, h, i, j: (j <= i) & ((h < dense_heads) | (i - j < w) | (j < s))
    return None


def useful_flops(name: str, params: dict, b: int, h: int, n: int, d: int) -> float:
    """Multiply-add FLOPs the variant needs (not what a kernel happens to compute)."""
    if name == "linear":
        c = params["chunk"]
        return b * h * (2 * n * c * d + 6 * n * d * (d + 1))  # intra (causal half of 2 matmuls) + state in/out
    if name == "dense":
        return 4 * b * h * d * n * (n + 1) / 2
    if name in ("block_sparse", "block_sparse_tau"):  # the tau row keeps at most this share
        return 4 * b * h * d * n * (n / 2) * params["keep"]
    if name == "per_head":
        per = []
        for w, s in zip(params["window"], params["sinks"]):
            if w == 0:
                per.append(n * (n + 1) / 2)
            else:
                lo, hi = intervals("sinks_window", freeze_params({"window": w, "sinks": s}), n, n, True)
                per.append(float((hi - lo + 1).clamp(min=0).sum()))
        return 4 * b * d * sum(per) * h / len(per)
    if name == "vertical_slash":  # the kept set per query (columns, sinks, bands, local bands), at most n
        kept = params["vertical"] + 1 + (params["slash"] + 2) * params["block"]
        return 4 * b * h * d * n * min(kept, n / 2)
    lo, hi = intervals(name, freeze_params(params), n, n, True)
    pairs = float((hi - lo + 1).clamp(min=0).sum())
    return 4 * b * h * d * pairs


def measure(fns: dict, repeat: int) -> dict:
    """Median seconds of each callable, runs interleaved round-robin after one warm-up each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for f in fns.values():
        f()  # warm-up: compiles (Triton autotune, Flex) happen here, outside the timings
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()  # CUDA launches are asynchronous: time to completion
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--variants", nargs="+",
                    default=["dense", "sliding_window", "sinks_window", "neighborhood_2d", "block_sparse",
                             "block_sparse_tau", "linear", "vertical_slash", "per_head"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                    help="default: float16 on CUDA (generated Triton kernels), float32 on CPU")
    args = ap.parse_args()
    global HEADS
    HEADS = args.heads
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if args.dtype:
        dt = getattr(torch, args.dtype)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    # one compile per (variant, N, D): past dynamo's default limit of 8 Flex would silently run eager
    # (slow, and at 16k it materialises the N x N scores and runs out of memory)
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    print(f"device={dev} dtype={dt} threads={torch.get_num_threads()} heads={args.heads} causal; "
          f"median of {args.repeat} interleaved runs")
    print("| variant | N | D | ours s | ours GFLOP/s | SDPA s | Flex s | SDPA/ours | Flex/ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for d in args.d:
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(1, args.heads, n, d, generator=g, device=dev, dtype=dt) for _ in range(3))
            for name in args.variants:
                prm = variant_params(name, n)
                fns = {
                    "ours": lambda: codegen.run(KERNEL.get(name, name), q, k, v, None, d ** -0.5, True, **prm),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                }
                mm = None if args.no_flex else flex_mask_mod(name, prm, n)
                if mm is not None:
                    bm = create_block_mask(mm, None, None, n, n, device=dev)
                    fns["flex"] = lambda: flex(q, k, v, block_mask=bm)
                with torch.no_grad():
                    t = measure(fns, args.repeat)
                fl = useful_flops(name, prm, 1, args.heads, n, d)
                ours, tf = t["ours"], t.get("flex")
                flex_s = "-" if tf is None else f"{tf:.4f}"
                flex_r = "-" if tf is None else f"{tf / ours:.2f}"
                print(f"| {name} | {n} | {d} | {ours:.4f} | {fl / ours / 1e9:.1f} | {t['sdpa']:.4f} | {flex_s} | "
                      f"{t['sdpa'] / ours:.2f} | {flex_r} |", flush=True)


if __name__ == "__main__":
    main()
