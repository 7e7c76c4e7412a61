"""Train the project's byte-level GPT (rewriter/lm.py) on the standard library's docstrings.

    python examples/train_tiny_lm.py --minutes 40 --out rewriter/assets/tiny_lm.pt

CPU only; prints the loss as it goes and the held-out perplexity at the end, which is stored in the
checkpoint's metadata.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewriter import lm  # noqa: E402


def main() -> None:
    """Train for a wall-clock budget with AdamW and a cosine schedule, then save and report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(lm.CHECKPOINT))
    ap.add_argument("--init", default=None, help="continue from this checkpoint (its weights; a fresh optimiser)")
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    train, held = lm.corpus("train"), lm.corpus("heldout")
    print(f"train {len(train) / 1e6:.2f} MB, held-out {len(held) / 1e6:.2f} MB of docstrings", flush=True)
    prior = {}
    if args.init:
        model = lm.load(args.init).train()
        cfg = model.cfg
        prior = torch.load(args.init, map_location="cpu", weights_only=True).get("meta", {})
        print(f"continuing from {args.init} ({prior})", flush=True)
    else:
        cfg = lm.LMConfig(context=args.context)
        model = lm.TinyLM(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    buf = torch.frombuffer(bytearray(train), dtype=torch.uint8)
    budget = args.minutes * 60
    t0 = time.time()
    step, tokens = 0, 0
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(buf) - args.context - 1, (args.batch,))
        batch = torch.stack([buf[s:s + args.context + 1] for s in starts.tolist()]).long()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch[:, 1:].numel()
        if step % 20 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.3f} lr {lr:.2e} tokens {tokens / 1e6:.2f}M",
                  flush=True)
    model.eval()
    ppl = lm.perplexity(model, lm.windows(held, args.context, 32, seed=1))
    print(f"held-out per-byte perplexity {ppl:.3f} after {step} steps, {tokens / 1e6:.2f}M tokens", flush=True)
    meta = {"heldout_ppl": ppl, "steps": step + int(prior.get("steps", 0)),
            "tokens": tokens + int(prior.get("tokens", 0)), "minutes": args.minutes + float(prior.get("minutes", 0))}
    lm.save(model, Path(args.out), meta)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
