"""Shared by the examples: argument parsing, optimize with progress, and a fair speed measurement."""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import torch  # noqa: E402

import rewriter  # noqa: E402
from passes.capture import split_inputs  # noqa: E402
from rewriter.report import time_interleaved  # noqa: E402


def parser(doc: str) -> argparse.ArgumentParser:
    """Arguments every example takes."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (what the tests run)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10, smoke 3)")
    return ap


def run(model, inputs, reps: int, **optimize_kwargs):
    """Optimize ``model``, print the plan, then measured error and speed against the original."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    opt = rewriter.optimize(model, inputs, progress=lambda m: print(f"  [{time.perf_counter() - t0:5.1f}s] {m}"),
                            **optimize_kwargs)
    print(opt.plan)
    a, k = split_inputs(inputs)
    with torch.no_grad():
        err = rewriter.relative_l2(model(*a, **k), opt(*a, **k))
    t = time_interleaved({"original": lambda: model(*a, **k), "optimized": lambda: opt(*a, **k)}, reps=reps)
    changed = [f"{d.site.name or '<top>'}: {d.variant}" for d in opt.plan.decisions if d.variant not in ("original",)]
    print(f"changed: {len(changed)} site(s) -> " + ", ".join(sorted(set(c.split(': ')[1] for c in changed))))
    print(f"original  {t['original']}")
    print(f"optimized {t['optimized']}")
    print(f"speedup {t['original'].median / t['optimized'].median:.2f}x (median over median, interleaved, "
          f"after warm-up); output error vs original {err:.2e} relative L2")
    return opt
