"""Command line: ``rewriter find`` lists attention sites, ``rewriter optimize`` rewrites and exports."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from rewriter import models
from rewriter.api import find_attention, optimize, relative_l2
from rewriter.artifact import export
from rewriter.capture import CaptureError, split_inputs


def _parse_variants(text: str | None):
    if not text:
        return None
    out = {}
    for item in text.split(";"):
        name, _, params = item.partition(":")
        kv = dict(p.split("=", 1) for p in params.split(",") if p)
        out[name.strip()] = {k: json.loads(v) for k, v in kv.items()} or None
    if all(v is None for v in out.values()):
        return list(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rewriter`` command."""
    ap = argparse.ArgumentParser(prog="rewriter", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("find", "optimize"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="minilm",
                       help="minilm (default, real weights), minilm-sdpa, or file.py:factory")
        p.add_argument("-v", "--verbose", action="store_true")
        if name == "optimize":
            p.add_argument("--budget", type=float, default=0.01, help="max relative L2 error; negative = no gate")
            p.add_argument("--variants", default=None, help="e.g. 'dense' or 'sliding_window:window=256'")
            p.add_argument("--out", default=None, help="export the optimized model to this directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, inputs = models.from_spec(args.model)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.cmd == "find":
            sites = find_attention(model, inputs)
            print(f"{len(sites)} attention site(s) in {type(model).__name__} ({time.perf_counter() - t0:.1f}s):")
            for s in sites:
                print("  " + s.describe())
            return 0
        budget = None if args.budget < 0 else args.budget
        opt = optimize(model, inputs, budget=budget, variants=_parse_variants(args.variants))
    except (CaptureError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_opt = time.perf_counter() - t0
    print(opt.plan)
    a, k = split_inputs(inputs)
    with torch.no_grad():
        err = relative_l2(model(*a, **k), opt(*a, **k))
        reps = 5
        t1 = time.perf_counter()
        for _ in range(reps):
            model(*a, **k)
        t2 = time.perf_counter()
        for _ in range(reps):
            opt(*a, **k)
        t3 = time.perf_counter()
    print(f"optimized in {t_opt:.1f}s; eager {1e3 * (t2 - t1) / reps:.2f} ms/call, "
          f"rewritten {1e3 * (t3 - t2) / reps:.2f} ms/call (not compiled), output error vs eager {err:.2e}")
    if args.out:
        print(f"exported to {export(opt, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
