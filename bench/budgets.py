"""What a budget means, per metric: the plan each budget buys and what a user then measures on held-out data.

    python bench/budgets.py [--only lm|minilm] [--threads 2]

The project's LM (``rewriter/lm.py``): 4 x 1024 bytes of training text calibrate (a quarter held back
by the planner), 8 x 1024 held-out bytes are only measured: held-out perplexity before and after,
the largest site error, and the plan's predicted attention time against all-dense. A second table
runs one loose budget with and without the per-site cap, which is how the default cap was chosen.

all-MiniLM-L6-v2 (real weights): 16 padded English sentences calibrate, 8 others are measured:
relative L2 of the hidden states over real tokens, and the mean cosine of the mean-pooled sentence
embeddings (what a sentence-embedding user compares).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewriter  # noqa: E402
from passes import metrics, pricing  # noqa: E402
from rewriter import lm, models  # noqa: E402

LM_BUDGETS = [("kl", 0.005), ("kl", 0.01), ("kl", 0.02), ("perplexity", 0.01), ("perplexity", 0.02),
              ("l2", 0.05), ("l2", 0.1)]
MINILM_BUDGETS = [("l2", 0.05), ("l2", 0.1), ("cosine", 0.002), ("cosine", 0.01)]
CAP_RUNS = [("kl", 0.05, None), ("kl", 0.05, 0.3), ("l2", 0.1, None), ("l2", 0.1, 0.3)]


def attention_ratio(plan) -> float:
    """Predicted attention time of the plan over all-dense attention, summed over sites."""
    hw = pricing.profile(plan.target)
    planned = dense = 0.0
    for d in plan.decisions:
        t_dense = pricing.seconds(d.site, "dense", {}, hw) or 0.0
        t = t_dense if d.variant in ("dense", "original") else pricing.seconds(d.site, d.variant, d.params, hw)
        planned, dense = planned + (t or t_dense), dense + t_dense
    return planned / dense if dense else 1.0


def summary(plan) -> str:
    """The variants per site, compactly."""
    out = []
    for d in plan.decisions:
        keys = {"window": "w", "sinks": "s", "keep": "keep", "rank": "r", "feature_map": "", "delta": "delta"}
        ps = ",".join(f"{keys[k]}{v}" if keys[k] else str(v) for k, v in sorted(d.params.items()) if k in keys)
        out.append(d.variant + (f"({ps})" if ps else ""))
    return " ".join(out)


def max_site_error(plan) -> float:
    """The largest site error among rewritten sites."""
    errs = [d.error for d in plan.decisions if d.error is not None and d.variant not in ("dense", "original")]
    return max(errs) if errs else 0.0


def run_lm() -> None:
    """Budgets per metric on the project's LM, then the site-cap comparison."""
    model = lm.load()
    n = model.cfg.context
    calib = lm.windows(lm.corpus("train"), n - 1, 4, seed=7)
    held = lm.windows(lm.corpus("heldout"), n, 8, seed=1)
    p0 = lm.perplexity(model, held)
    print(f"project LM: held-out perplexity {p0:.3f} per byte (8 x {n} bytes); calibration 4 x {n} bytes")
    head = f"{'metric':>10} {'budget':>7} {'cap':>5} {'calib err':>10} {'ppl change':>10} {'max site err':>12} " \
           f"{'attn time':>9} {'plan s':>6}  plan"
    print(head)

    def row(metric: str, budget: float, cap) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            opt = rewriter.optimize(model, calib, budget=budget, metric=metric, site_cap=cap, dynamic=False)
        wall = time.perf_counter() - t0
        p1 = lm.perplexity(opt, held)
        cap_s = "none" if cap is None else f"{cap:g}"
        print(f"{metric:>10} {budget:>7g} {cap_s:>5} {opt.plan.error:>10.3g} {100 * (p1 / p0 - 1):>+9.2f}% "
              f"{max_site_error(opt.plan):>12.2f} {100 * attention_ratio(opt.plan):>8.0f}% {wall:>6.0f}  "
              f"{summary(opt.plan)}", flush=True)

    for metric, budget in LM_BUDGETS:
        row(metric, budget, rewriter.api.DEFAULT_SITE_CAP)
    print("\nper-site cap: the same loose budgets with and without it")
    print(head)
    for metric, budget, cap in CAP_RUNS:
        row(metric, budget, cap)


def run_minilm() -> None:
    """Budgets per metric on all-MiniLM-L6-v2 with held-out sentences."""
    from transformers import AutoTokenizer

    model, _ = models.minilm()
    tok = AutoTokenizer.from_pretrained(models.minilm_dir())
    text = lm.corpus("heldout").decode()
    parts = [p.strip().replace("\n", " ") for p in text.split(". ") if 40 < len(p.strip()) < 600]

    def sentences(count: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        picked = [parts[i] for i in torch.randperm(len(parts), generator=g)[:count].tolist()]
        return dict(tok(picked, padding="max_length", truncation=True, max_length=256, return_tensors="pt"))

    calib, held = sentences(16, 0), sentences(8, 1)
    pad = held["attention_mask"].bool()
    w = held["attention_mask"].unsqueeze(-1).float()
    emb = lambda o: (o.last_hidden_state * w).sum(1) / w.sum(1)  # noqa: E731
    with torch.no_grad():
        ref = model(**held)
    print("\nall-MiniLM-L6-v2: 16 calibration sentences, 8 held-out sentences, padded to 256 tokens")
    print(f"{'metric':>10} {'budget':>7} {'calib err':>10} {'held l2':>8} {'held cos':>9} {'max site err':>12} "
          f"{'attn time':>9}  plan")
    for metric, budget in MINILM_BUDGETS:
        with torch.no_grad():
            opt = rewriter.optimize(model, calib, budget=budget, metric=metric, dynamic=False)
            out = opt(**held)
        l2 = metrics.error(ref, out, "l2", pad)
        cos = float(torch.nn.functional.cosine_similarity(emb(ref), emb(out)).mean())
        print(f"{metric:>10} {budget:>7g} {opt.plan.error:>10.3g} {l2:>8.3f} {cos:>9.4f} "
              f"{max_site_error(opt.plan):>12.2f} {100 * attention_ratio(opt.plan):>8.0f}%  {summary(opt.plan)}",
              flush=True)


def main() -> None:
    """Print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("lm", "minilm"), default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from codegen import hw_calibrate

    hw, _ = hw_calibrate.ensure_calibrated()
    pricing.profile.cache_clear()
    print(f"CPU profile: {hw.source}")
    if args.only in (None, "lm"):
        run_lm()
    if args.only in (None, "minilm"):
        run_minilm()


if __name__ == "__main__":
    main()
