"""Train the project's byte-level LMs on docstrings: the standard library's and the installed packages'.

    python examples/train_tiny_lm.py --minutes 110 --threads 1 --out rewriter/assets/tiny_lm.pt \
        | tee rewriter/assets/tiny_lm.log
    python examples/train_tiny_lm.py --arch llama --context 2048 --batch 4 --precision float32 \
        --minutes 50 --out rewriter/assets/rope_lm.pt | tee rewriter/assets/rope_lm.log

``--arch gpt`` is the GPT of rewriter/lm.py; ``--arch llama`` the rotary GQA model of rewriter/rope_lm.py.

CPU only, bfloat16 autocast by default (2.4x faster than float32 on an AVX-512-BF16 CPU, 12x slower on
AVX2 without BF16: pass ``--precision float32`` there). The training text is the
standard library's training split (``lm.corpus("train")``) plus the docstrings of every package in this
environment's site-packages, deduplicated and capped per package so that no one library's style dominates.
The held-out split of the standard library is never trained on; its per-byte perplexity is printed as
training goes and at the end, and stored in the checkpoint's metadata.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewriter import lm, rope_lm  # noqa: E402


def package_docstrings(cap_bytes: int) -> tuple[bytes, dict[str, int]]:
    """Deduplicated docstrings of the installed packages, at most ``cap_bytes`` per top-level package."""
    root = sysconfig.get_paths()["purelib"]
    seen: set[bytes] = set()
    texts, sizes = [], {}
    for top in sorted(os.listdir(root)):
        path = os.path.join(root, top)
        if not os.path.isdir(path) or top.endswith((".dist-info", ".egg-info")) or top.startswith("_"):
            continue
        size = 0
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in ("tests", "test", "__pycache__"))
            for name in sorted(filenames):
                if not name.endswith(".py") or size >= cap_bytes:
                    continue
                for doc in lm._docstrings(os.path.join(dirpath, name)):
                    key = hashlib.sha1(doc.encode("utf-8", errors="ignore")).digest()
                    if key not in seen:
                        seen.add(key)
                        texts.append(doc)
                        size += len(doc)
        if size:
            sizes[top] = size
    return "\n\n".join(texts).encode("utf-8", errors="ignore"), sizes


def main() -> None:
    """Train for a wall-clock budget with AdamW and a cosine schedule, then save and report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=110.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cap-mb", type=float, default=2.0, help="most docstring megabytes taken from one package")
    ap.add_argument("--stdlib-only", action="store_true", help="train on the standard library's docstrings alone")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--arch", choices=("gpt", "llama"), default="gpt")
    ap.add_argument("--precision", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--out", default=None, help="checkpoint path (default: the architecture's shipped one)")
    ap.add_argument("--init", default=None, help="continue from this checkpoint (its weights; a fresh optimiser)")
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    arch = rope_lm if args.arch == "llama" else lm
    out = args.out or str(arch.CHECKPOINT)
    torch.set_num_threads(args.threads)
    train, held = lm.corpus("train"), lm.corpus("heldout")
    sizes: dict[str, int] = {}
    if not args.stdlib_only:
        extra, sizes = package_docstrings(int(args.cap_mb * 1e6))
        train = train + b"\n\n" + extra
    print(f"train {len(train) / 1e6:.2f} MB (standard library + {len(sizes)} packages), "
          f"held-out {len(held) / 1e6:.2f} MB of standard-library docstrings", flush=True)
    print("largest packages: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in
                                           sorted(sizes.items(), key=lambda kv: -kv[1])[:8]), flush=True)
    prior = {}
    if args.init:
        model = arch.load(args.init).train()
        cfg = model.cfg
        prior = torch.load(args.init, map_location="cpu", weights_only=True).get("meta", {})
        print(f"continuing from {args.init} ({prior})", flush=True)
    else:
        if args.arch == "llama":
            cfg = rope_lm.RopeLMConfig(context=args.context)
            model = rope_lm.RopeLM(cfg)
        else:
            cfg = lm.LMConfig(context=args.context)
            model = lm.TinyLM(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, config {cfg}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    buf = torch.frombuffer(bytearray(train), dtype=torch.uint8)
    probe = lm.windows(held, args.context, 8, seed=3)  # a small held-out probe for the log, not the final figure
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch[:, 1:].numel()
        if step % 20 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.3f} lr {lr:.2e} tokens {tokens / 1e6:.2f}M",
                  flush=True)
        if step % args.eval_every == 0:
            model.eval()
            print(f"step {step} held-out probe perplexity {lm.perplexity(model, probe):.3f}", flush=True)
            model.train()
    model.eval()
    ppl = lm.perplexity(model, lm.windows(held, args.context, 32, seed=1))
    print(f"held-out per-byte perplexity {ppl:.3f} after {step} steps, {tokens / 1e6:.2f}M tokens", flush=True)
    meta = {"heldout_ppl": ppl, "steps": step + int(prior.get("steps", 0)),
            "tokens": tokens + int(prior.get("tokens", 0)), "minutes": args.minutes + float(prior.get("minutes", 0)),
            "train_mb": round(len(train) / 1e6, 2), "packages": len(sizes)}
    meta["arch"] = args.arch
    arch.save(model, Path(out), meta)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
