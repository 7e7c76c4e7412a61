"""Plan a Llama-2-70B-shaped model on the meta device for an H100: capture, find, rewrite and price.

No weights are allocated: the model is built under ``torch.device("meta")`` and the input ids are a
meta tensor too, so torch.export traces shapes only. ``rewriter.optimize(..., target="h100")`` finds
every site, rewrites it (exact ``dense``, or the pinned ``--variants``) and prices it with the H100
profile. Prints the plan's first rows, the number of sites found (must be 80) and priced (all of
them), the wall time of the whole call (target < 30 s; its CPU time is printed beside it, since
wall time grows when other work shares the cores) and the peak resident memory of this process (RSS
high-water mark, target < 2 GB), and exits non-zero when a target is missed.

    python bench/capture_70b_meta.py [--layers 80] [--tokens 32768] [--target h100] [--window 4096]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

# The repo root first: bench/cost_model.py would otherwise shadow the cost_model package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--target", default="h100")
    ap.add_argument("--window", type=int, default=4096, help="pin sliding_window(W) on every site; 0: exact dense")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--max-gb", type=float, default=2.0)
    args = ap.parse_args(argv)

    t_import = time.perf_counter()
    from transformers import LlamaConfig, LlamaForCausalLM

    import rewriter

    import_s = time.perf_counter() - t_import
    rss_after_import = peak_rss_bytes()

    config = LlamaConfig(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=args.layers,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=args.tokens,
        rms_norm_eps=1e-5, attn_implementation="sdpa",
    )
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())

    input_ids = torch.zeros(args.batch, args.tokens, dtype=torch.long, device="meta")
    variants = {"sliding_window": {"window": args.window}} if args.window else ["dense"]
    t1, c1 = time.perf_counter(), time.process_time()
    opt = rewriter.optimize(model, {"input_ids": input_ids}, target=args.target, variants=variants, budget=None)
    find_s, find_cpu = time.perf_counter() - t1, time.process_time() - c1
    peak = peak_rss_bytes()
    sites = opt.plan.sites
    priced = [d for d in opt.plan.decisions if d.predicted_speedup is not None]
    lines = str(opt.plan).splitlines()
    print("\n".join(lines[:5] + [f"... ({len(lines) - 5} more lines)"]))
    print()

    expected = args.layers
    ok_count = len(sites) == expected
    ok_shape = all(
        s.num_heads == 64 and s.num_kv_heads == 8 and s.head_dim == 128 and s.q_len == args.tokens
        and s.kv_len == args.tokens and s.causal and not s.is_cross
        for s in sites
    )
    ok_priced = len(priced) == expected
    ok_time = find_s < args.max_seconds
    ok_mem = peak < args.max_gb * 2**30

    rows = [
        ("model", f"Llama-2-70B shape, {args.layers} layers, {n_params / 1e9:.1f}B params on meta", ""),
        ("tokens", f"{args.batch} x {args.tokens}", ""),
        ("sites found", f"{len(sites)}", f"== {expected}: {'ok' if ok_count else 'MISSED'}"),
        ("site flags", "causal, 64h/8kv, d128" if ok_shape else "WRONG", "ok" if ok_shape else "MISSED"),
        ("sites priced", f"{len(priced)} for {args.target}" + (
            f", predicted speedup {min(d.predicted_speedup for d in priced):.2f}x.."
            f"{max(d.predicted_speedup for d in priced):.2f}x" if priced else ""),
         f"== {expected}: {'ok' if ok_priced else 'MISSED'}"),
        ("optimize (capture, find, rewrite, price)", f"{find_s:.1f} s",
         f"< {args.max_seconds:g} s: {'ok' if ok_time else 'MISSED'}"),
        ("(its CPU time)", f"{find_cpu:.1f} s", "process CPU time; wall > CPU when the machine is shared"),
        ("peak RSS", f"{peak / 2**30:.2f} GB", f"< {args.max_gb:g} GB: {'ok' if ok_mem else 'MISSED'}"),
        ("(build on meta)", f"{build_s:.1f} s", ""),
        ("(imports)", f"{import_s:.1f} s, RSS {rss_after_import / 2**30:.2f} GB", ""),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for a, b, c in rows:
        print(f"{a.ljust(w0)}  {b.ljust(w1)}  {c}".rstrip())
    if sites and not ok_shape:
        for s in sites[:3]:
            print("  e.g.", s.describe())
    return 0 if (ok_count and ok_shape and ok_priced and ok_time and ok_mem) else 1


if __name__ == "__main__":
    sys.exit(main())
