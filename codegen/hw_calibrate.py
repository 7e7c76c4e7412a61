"""Measure this CPU for the cost model (matmul, exp, element ops, bandwidth, call overhead).

``cost_model`` imports sympy only, so the torch micro-benchmarks live here and are handed
to ``cost_model.hardware.cpu_profile(measure=...)``.  Run ``python -m codegen.hw_calibrate``
(``--force`` to re-measure) to write the cached profile.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Callable

import torch

from cost_model import hardware

logger = logging.getLogger(__name__)


def _best(fn: Callable[[], object], repeat: int = 7, inner: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure(threads: int | None = None) -> dict[str, float]:
    """Run the micro-benchmarks and return the fields of a CPU profile."""
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out: dict[str, float] = {"threads": float(torch.get_num_threads())}
    # matmul units: batched GEMMs at attention tile shapes, operands cache-resident
    rates = []
    for m, n, k in ((256, 512, 64), (256, 64, 512), (64, 320, 128), (128, 128, 128)):
        bt = max(1, int(3e7 // (m * n * k)))
        a, b = torch.randn(bt, m, k, generator=g), torch.randn(bt, k, n, generator=g)
        c = torch.empty(bt, m, n)
        rates.append(bt * m * n * k / _best(lambda: torch.bmm(a, b, out=c)))
    out["mac_per_s"] = sorted(rates)[len(rates) // 2]
    # exp and other element ops on 1 MiB arrays (in cache): the compute rate, not memory
    x = torch.randn(64, 4096, generator=g)
    y = torch.empty_like(x)
    out["exp_per_s"] = x.numel() / _best(lambda: torch.exp(x, out=y), inner=10)
    add = x.numel() / _best(lambda: torch.sub(x, y, out=y), inner=10)
    red = x.numel() / _best(lambda: torch.amax(x, dim=-1), inner=10)
    out["other_per_s"] = 2.0 / (1.0 / add + 1.0 / red)
    # main memory: read a 512 MiB tensor; write into freshly allocated 256 MiB (page faults included,
    # as every eager op writes into a new allocation)
    big = torch.ones(128 << 20)
    out["read_bytes_per_s"] = big.numel() * 4 / _best(lambda: big.sum(), repeat=3)
    n_w = 64 << 20
    out["write_bytes_per_s"] = n_w * 4 / _best(lambda: torch.empty(n_w).fill_(1.0), repeat=3)
    del big
    # per-call overhead of a tiny op
    z = torch.ones(4)
    out["launch_s"] = _best(lambda: torch.add(z, 1.0), repeat=5, inner=2000)
    logger.info("calibration: %s", out)
    return out


def calibrate(force: bool = False, threads: int | None = None) -> hardware.Hardware:
    """Return this CPU's profile, measuring (and caching) it if absent or forced."""
    return hardware.cpu_profile(refresh=force, measure=lambda: measure(threads))


def main(argv: list[str] | None = None) -> int:
    """CLI: measure this CPU and print the cached profile."""
    ap = argparse.ArgumentParser(prog="python -m codegen.hw_calibrate", description=__doc__)
    ap.add_argument("--force", action="store_true", help="re-measure even if a cached profile exists")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while measuring")
    args = ap.parse_args(argv)
    hw = calibrate(force=args.force, threads=args.threads)
    print(json.dumps(hardware.as_dict(hw), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
