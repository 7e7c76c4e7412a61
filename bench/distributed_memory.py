"""Planning across processes against one process, on a Llama-shaped model whose weights dominate memory.

Builds (once) a Hugging Face directory: 16 layers at hidden size 1024, GQA, random weights saved as
safetensors, with a tokenizer. Then runs, one after the other (never together),
  1. ``python -m rewriter optimize --model DIR --out A1`` (one process), and
  2. ``torchrun --nproc-per-node 2 -m rewriter optimize --model DIR --out A2``,
and prints each process's peak RSS, whether the plans choose the same variant per site, and the largest
difference between the two loaded artifacts' logits on fresh token ids.

    python bench/distributed_memory.py [--dir /tmp/llama-16x1024] [--seq-len 256] [--layers 16]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, layers: int, hidden: int) -> None:
    """A Llama-shaped model with random weights and the MiniLM WordPiece tokenizer, saved as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from rewriter.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      max_position_embeddings=4096, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {path}: {layers} layers, hidden {hidden}, {n:,} parameters ({n * 4 / 2**30:.2f} GiB fp32)")


def run(cmd: list[str], env: dict) -> tuple[float, str, float]:
    """(seconds, combined output, the largest peak RSS in MB among the processes it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return took, out, max(peak, before) / 1024


def main() -> None:
    """Build, run both, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llama-16x1024")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default="/tmp/dist-bench")
    args = ap.parse_args()
    d, work = Path(args.dir), Path(args.work)
    if not (d / "config.json").exists():
        build(d, args.layers, args.hidden)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ATTENTION_REWRITER_CALIBRATE": os.environ.get("ATTENTION_REWRITER_CALIBRATE", "1")}
    common = ["optimize", "--model", str(d), "--seq-len", str(args.seq_len), "--metric", "kl", "--budget", "0.01"]
    print(f"uptime: {os.popen('uptime').read().strip()}")
    t1, out1, rss1 = run([sys.executable, "-m", "rewriter", *common, "--out", str(work / "single"), "--no-report",
                          "--reps", "1"], env)
    (work / "single.log").write_text(out1)
    print(f"one process: {t1:.0f} s, peak RSS {rss1:.0f} MB", flush=True)
    t2, out2, _ = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rewriter",
                       *common, "--out", str(work / "two")], {**env, "OMP_NUM_THREADS": "1"})
    (work / "two.log").write_text(out2)
    ranks = {int(r): float(mb) for r, mb in re.findall(r"rank (\d+): peak RSS (\d+) MB", out2)}
    single = json.loads((work / "single" / "plan.json").read_text())["plan"]["decisions"]
    two = json.loads((work / "two" / "pipeline.json").read_text())["plan"]["decisions"]
    same = [a["variant"] for a in single] == [b["variant"] for b in two]

    print(f"{'run':<28} {'wall s':>8} {'peak RSS MB':>12} {'share of single':>16}")
    print(f"{'one process':<28} {t1:>8.0f} {rss1:>12.0f} {'100%':>16}")
    for r, mb in sorted(ranks.items()):
        print(f"{f'2 ranks (gloo), rank {r}':<28} {t2:>8.0f} {mb:>12.0f} {f'{100 * mb / rss1:.0f}%':>16}")
    print(f"same variant per site: {same} ({sum(x['variant'] != 'dense' for x in two)} of {len(two)} sites "
          "approximate in the distributed plan); same parameters per site: "
          f"{[a['params'] for a in single] == [b['params'] for b in two]}")

    sys.path.insert(0, str(ROOT))
    import rewriter

    a, b = rewriter.load(work / "single"), rewriter.load(work / "two")
    ids = torch.randint(0, 1000, (3, args.seq_len), generator=torch.Generator().manual_seed(7))
    given = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    kw = {k: v for k, v in given.items() if k in a.spec.captured}  # what the tokenizer gave the example
    with torch.no_grad():
        la, lb = a(**kw), b(**kw)
    la, lb = (getattr(x, "logits", x) for x in (la, lb))
    if isinstance(la, (tuple, list)):
        la, lb = la[0], lb[0]
    diff = float((la - lb).abs().max())
    print(f"loaded artifacts, max |logits difference| on fresh ids: {diff:.2e}")


if __name__ == "__main__":
    main()
