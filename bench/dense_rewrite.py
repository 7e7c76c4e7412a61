"""The exact dense rewrite against its peers, measured in one run on this machine.

For a Llama-shaped model with eager (matmul/softmax/matmul) attention, times one forward of:
  eager       the model as written
  optimize    rewriter.optimize(model, variants=["dense"]) (no compiler)
  inductor    torch.compile(model) (Inductor, with its own attention pattern matcher)
  rewriter    torch.compile(model, backend="rewriter")
and prints each as ms and as a ratio to eager and to Inductor. Ratios are what to read: the
machine is shared and noisy. Usage: python bench/dense_rewrite.py [--lengths 256,1024] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# The repo root first: bench/cost_model.py would otherwise shadow the cost_model package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rewriter  # noqa: E402


def _model(n_layers: int, hidden: int, heads: int, kv_heads: int):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=n_layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _time(fn, reps: int) -> float:
    with torch.no_grad():
        fn()  # warm-up (and compile)
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    model = _model(args.layers, 256, 8, 2)
    print(f"Llama-shaped, {args.layers} layers, hidden 256, 8 heads / 2 kv heads, batch 1, "
          f"threads {torch.get_num_threads()}, median of {args.reps}")
    print(f"{'N':>6} {'eager ms':>9} {'optimize':>9} {'inductor':>9} {'rewriter':>9}   "
          f"{'opt/eager':>9} {'rw/eager':>9} {'rw/inductor':>11}")
    for n in [int(x) for x in args.lengths.split(",")]:
        inputs = {"input_ids": torch.randint(0, 1000, (1, n)), "use_cache": False}
        opt = rewriter.optimize(model, inputs, variants=["dense"])
        torch._dynamo.reset()
        ind = torch.compile(model)
        t_e = _time(lambda: model(**inputs), args.reps)
        t_o = _time(lambda: opt(**inputs), args.reps)
        t_i = _time(lambda: ind(**inputs), args.reps)
        torch._dynamo.reset()
        rw = torch.compile(model, backend="rewriter")
        t_r = _time(lambda: rw(**inputs), args.reps)
        print(f"{n:>6} {1e3 * t_e:>9.2f} {1e3 * t_o:>9.2f} {1e3 * t_i:>9.2f} {1e3 * t_r:>9.2f}   "
              f"{t_e / t_o:>8.2f}x {t_e / t_r:>8.2f}x {t_i / t_r:>10.2f}x")


if __name__ == "__main__":
    main()
