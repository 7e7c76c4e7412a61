"""Wall time and peak memory of ``rewriter.optimize`` with the default candidates on MiniLM (16 x 256 tokens).

    python bench/planner.py [--budget 0.05] [--threads 2]

Calibration is 16 sequences of 256 tokens of real English prose (the standard library's docstrings,
tokenised by MiniLM's own tokenizer), batched as one sample; a quarter of the rows is held out.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewriter  # noqa: E402
from rewriter import lm, models  # noqa: E402


def prose_batch(rows: int = 16, length: int = 256) -> dict:
    """``rows`` windows of ``length`` MiniLM tokens of held-out docstring prose ([CLS] ... [SEP])."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.minilm_dir())
    ids = tok(lm.corpus("heldout").decode(), add_special_tokens=False, return_tensors="pt",
              verbose=False)["input_ids"][0]
    body = length - 2
    chunks = [torch.cat([torch.tensor([tok.cls_token_id]), ids[i * body:(i + 1) * body],
                         torch.tensor([tok.sep_token_id])])
              for i in range(rows)]
    batch = torch.stack(chunks)
    return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}


def main() -> None:
    """Time one optimize call and print the plan, wall time and peak resident memory."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    model, _ = models.minilm()
    inputs = prose_batch()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    opt = rewriter.optimize(model, inputs, budget=args.budget)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(opt.plan)
    print(f"\noptimize on MiniLM, 16 x 256 calibration tokens, budget {args.budget}: {wall:.1f} s wall, "
          f"peak RSS {rss:.0f} MB ({rss0:.0f} MB before optimize); target < 120 s")


if __name__ == "__main__":
    main()
