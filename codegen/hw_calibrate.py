"""Measure this CPU for the cost model (matmul, exp, element ops, bandwidth, call overhead).

``cost_model`` imports sympy only, so the torch micro-benchmarks live here and are handed
to ``cost_model.hardware.cpu_profile(measure=...)``.  Run ``python -m codegen.hw_calibrate``
(``--force`` to re-measure) to write the cached profile.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Callable

import torch

from cost_model import hardware

logger = logging.getLogger(__name__)


def _proc_times() -> tuple[float, float, float]:
    """(all CPUs' busy seconds, all CPUs' total seconds, this process's CPU seconds) from /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    total = sum(vals[:8])  # guest time is already counted in user time
    idle = vals[3] + vals[4]
    t = os.times()
    return (total - idle) / hz, total / hz, t.user + t.system


class Contention:
    """How many cores other processes kept busy between ``start()`` and ``cores()`` (0.0 where unknown)."""

    def __init__(self) -> None:
        self._t0: tuple[float, float, float] | None = None

    def start(self) -> "Contention":
        """Begin a window."""
        try:
            self._t0 = _proc_times()
        except OSError:
            self._t0 = None
        return self

    def cores(self) -> float:
        """Cores' worth of CPU time other processes used since ``start()``."""
        if self._t0 is None:
            return 0.0
        try:
            busy1, total1, own1 = _proc_times()
        except OSError:
            return 0.0
        busy0, total0, own0 = self._t0
        n = os.cpu_count() or 1
        wall = max((total1 - total0) / n, 1e-6)
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def others_cores(interval: float = 0.5) -> float:
    """Cores' worth of CPU time other processes use, sampled over ``interval`` seconds."""
    c = Contention().start()
    time.sleep(interval)
    return c.cores()


#: other processes may use this many cores' worth of time while a calibration runs; more, and the
#: figures are not this machine's (one spinning process halves a 2-thread matmul rate)
CONTENDED_CORES = 0.3
#: at least two of a figure's rounds must agree within this factor (the median is then one of them);
#: single rounds on a shared VM read up to 3x off even with no other process running
SPREAD_LIMIT = 1.25
#: kernel factors outside these bounds are a failed timing, not a property of the machine
FACTOR_BOUNDS = (0.1, 10.0)


def wait_quiet(max_wait_s: float = 30.0, threshold: float = CONTENDED_CORES) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores; return the cores they use."""
    deadline = time.time() + max_wait_s
    used = others_cores()
    while used > threshold and time.time() < deadline:
        time.sleep(1.0)
        used = others_cores()
    if used > threshold:
        logger.warning("other processes keep %.1f cores busy; measurements may be refused", used)
    return used


def _best(fn: Callable[[], object], repeat: int = 15, inner: int = 1) -> float:
    """Minimum time per call over ``repeat`` trials of ``inner`` calls (the min filters contention)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


#: (m, n, k) block-matmul shapes timed for the eager MAC-rate table
GEMM_SHAPES = ((64, 64, 64), (64, 64, 128), (64, 128, 64), (128, 128, 128), (64, 320, 64), (64, 64, 320),
               (64, 320, 128), (64, 128, 320), (64, 1, 64), (1, 64, 64), (256, 256, 64), (256, 64, 256),
               (64, 64, 16), (64, 16, 64), (16, 64, 64))


#: the block shapes the quick mode keeps (the ones attention kernels use most)
QUICK_SHAPES = ((64, 64, 64), (64, 320, 64), (64, 64, 320), (128, 128, 128), (64, 1, 64))


def measure(threads: int | None = None, quick: bool = False, progress: Callable[[str], None] | None = None,
            rounds: int = 3, attempts: int = 2) -> dict[str, object]:
    """Measure this CPU ``rounds`` times and return the figures' medians, or raise CalibrationRefused.

    A measurement is refused when other processes used the cores while it ran, when no two of a figure's
    rounds agree within SPREAD_LIMIT, or when a kernel factor lands outside FACTOR_BOUNDS. Each refusal
    waits for a quiet CPU and tries again, ``attempts`` times in all. ``quick`` (seconds a round) takes a
    smaller GEMM table and memory probe and waits less; the profile records ``quick: 1``.
    """
    say = progress or (lambda msg: logger.info("calibration: %s", msg))
    if threads:
        torch.set_num_threads(threads)
    problems: list[str] = []
    for attempt in range(attempts):
        before = wait_quiet(5.0 if quick else 30.0) if attempt or not quick else others_cores(0.2)
        results, loads = [], []
        for r in range(rounds):
            say(f"round {r + 1} of {rounds}" + (f" (attempt {attempt + 1})" if attempt else ""))
            window = Contention().start()
            results.append(_measure_round(quick, say if r == 0 else (lambda msg: None)))
            loads.append(window.cores())
        out, problems = combine(results, loads)
        if not problems:
            out.update(threads=float(torch.get_num_threads()), others_cores_before=before,
                       others_cores=max(loads), rounds=float(rounds))
            if quick:
                out["quick"] = 1.0
            logger.info("calibration: %s", out)
            return out
        logger.warning("calibration attempt %d refused: %s", attempt + 1, "; ".join(problems))
    raise hardware.CalibrationRefused(problems)


def combine(results: list[dict], loads: list[float]) -> tuple[dict[str, object], list[str]]:
    """Median of each figure over rounds, and what makes the set untrustworthy (empty when nothing does)."""
    problems = []
    worst = max(loads, default=0.0)
    if worst > CONTENDED_CORES:
        problems.append(f"other processes kept {worst:.1f} cores busy while it measured")
    out: dict[str, object] = {}
    spreads = {}
    for key in results[0]:
        vals = [r[key] for r in results if key in r]
        if key == "gemm_table":
            out[key] = [[*row[:3], statistics.median(r[key][i][3] for r in results)] for i, row in enumerate(vals[0])]
            continue
        out[key] = statistics.median(vals)
        vals = sorted(float(v) for v in vals)
        if len(vals) > 1 and vals[0] > 0:
            spreads[key] = min(b / a for a, b in zip(vals, vals[1:]))
    uneven = {k: v for k, v in spreads.items() if v > SPREAD_LIMIT}
    if uneven:
        k = max(uneven, key=uneven.get)
        problems.append(f"no two rounds of {len(uneven)} figure(s) agreed within {SPREAD_LIMIT}x "
                        f"({k}: closest pair {uneven[k]:.2f}x apart)")
    lo, hi = FACTOR_BOUNDS
    clamped = {k: v for k, v in out.items() if k.startswith("factor_") and not lo <= float(v) <= hi}
    if clamped:
        k = next(iter(clamped))
        problems.append(f"kernel timing {k} = {float(clamped[k]):.2g} is outside {lo}..{hi} (a failed timing)")
    out["spread"] = max(spreads.values(), default=1.0)
    return out, problems


def _measure_round(quick: bool, say: Callable[[str], None]) -> dict[str, object]:
    """One round of every micro-benchmark."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, object] = {}
    say("matmul rate")
    # matmul units: batched GEMMs at attention tile shapes, operands cache-resident
    rates = []
    for m, n, k in ((256, 512, 64), (256, 64, 512), (64, 320, 128), (128, 128, 128)):
        bt = max(1, int(3e7 // (m * n * k)))
        a, b = torch.randn(bt, m, k, generator=g), torch.randn(bt, k, n, generator=g)
        c = torch.empty(bt, m, n)
        rates.append(bt * m * n * k / _best(lambda: torch.bmm(a, b, out=c), repeat=15))
    out["mac_per_s"] = sorted(rates)[len(rates) // 2]
    # exp and other element ops: the slope between two cache-resident sizes, so the per-call
    # overhead drops out and what remains is the vector units' rate; operands stay in L1 as
    # they do inside a fused kernel's tile
    def rate(op: Callable[[torch.Tensor, torch.Tensor], object]) -> float:
        small, large = torch.randn(8, 128, generator=g), torch.randn(8, 512, generator=g)
        ys, yl = torch.empty_like(small), torch.empty_like(large)
        slopes = []
        for _ in range(5):  # a difference of two short timings is noisy: the median of five
            t_small = _best(lambda: op(small, ys), repeat=10, inner=200)
            t_large = _best(lambda: op(large, yl), repeat=10, inner=200)
            slopes.append((large.numel() - small.numel()) / max(t_large - t_small, 1e-9))
        return statistics.median(slopes)

    say("element-op rates")
    out["exp_per_s"] = rate(lambda x, y: torch.exp(x, out=y))
    add = rate(lambda x, y: torch.sub(x, y, out=y))
    red = rate(lambda x, y: torch.amax(x, dim=-1))
    out["other_per_s"] = 2.0 / (1.0 / add + 1.0 / red)
    # element ops as separate library calls on an attention-sized tensor (10 MiB, fresh outputs):
    # a representative mix, each weighted by the element ops the cost model counts for it
    xa = torch.randn(128, 64, 320, generator=g)
    row = xa.amax(-1, keepdim=True)
    n_el = xa.numel()
    mix = [  # (call, element ops it performs, of which exponentials)
        (lambda: xa - row, 1, 0), (lambda: xa / row, 1, 0), (lambda: xa * 2.0, 1, 0),
        (lambda: xa.amax(-1), 1, 0), (lambda: xa.sum(-1), 1, 0), (lambda: torch.cumsum(xa, 1), 1, 0),
        (lambda: torch.softmax(xa, -1), 5, 1), (lambda: torch.nn.functional.elu(xa), 3, 1),
        (lambda: torch.exp(xa), 1, 1),
    ]
    spent, ops = 0.0, 0
    for fn, n_ops, _ in mix:
        spent += _best(fn, repeat=7)
        ops += n_ops * n_el
    out["eager_other_per_s"] = ops / spent
    out["eager_exp_per_s"] = n_el / _best(lambda: torch.exp(xa), repeat=7)
    say("library matmuls")
    # batched block matmuls as library calls on attention-sized operands (scores-like outputs)
    qb, kb = torch.randn(128, 64, 64, generator=g), torch.randn(128, 64, 320, generator=g)
    pb, vb = torch.randn(128, 64, 320, generator=g), torch.randn(128, 320, 64, generator=g)
    t_qk = _best(lambda: torch.bmm(qb, kb), repeat=7)
    t_av = _best(lambda: torch.bmm(pb, vb), repeat=7)
    out["eager_mac_per_s"] = 2 * 128 * 64 * 64 * 320 / (t_qk + t_av)
    # library matmul efficiency depends on the block shape: a small table of (m, n, k) -> MAC/s,
    # batches sized like attention's (operands and outputs of a few MiB)
    table = []
    for m, n, k in (QUICK_SHAPES if quick else GEMM_SHAPES):
        bt = max(1, int(8e6 // (m * n + m * k + k * n)))
        a, b = torch.randn(bt, m, k, generator=g), torch.randn(bt, k, n, generator=g)
        table.append([m, n, k, bt * m * n * k / _best(lambda: torch.bmm(a, b), repeat=5)])
    out["gemm_table"] = table
    # hand-over between kernels through the last-level cache: copy 8 MiB into 8 MiB
    src, dst = torch.randn(2 << 20, generator=g), torch.empty(2 << 20)
    say("bandwidths")
    out["cache_bytes_per_s"] = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeat=20)
    # main memory: read a 512 MiB tensor; write into freshly allocated 256 MiB (page faults included,
    # as every eager op writes into a new allocation). Quick mode: 128/64 MiB, still far past the LLC.
    big = torch.ones((32 if quick else 128) << 20)
    out["read_bytes_per_s"] = big.numel() * 4 / _best(lambda: big.sum(), repeat=3)
    n_w = (16 if quick else 64) << 20
    out["write_bytes_per_s"] = n_w * 4 / _best(lambda: torch.empty(n_w).fill_(1.0), repeat=3)
    big = torch.empty(0)  # free the probe
    # per-call overhead of a tiny op
    # per-call overhead of library calls on tiny operands (dispatch, allocation, threading):
    # the median over the kinds of call an eager attention makes
    z, zm = torch.ones(4), torch.ones(2, 4, 4)
    calls = [lambda: torch.add(z, 1.0), lambda: torch.matmul(zm, zm.transpose(-1, -2)),
             lambda: torch.softmax(zm, -1), lambda: zm.sum(-1), lambda: torch.exp(z)]
    say("call overhead")
    costs = sorted(_best(fn, repeat=20, inner=200) for fn in calls)
    out["launch_s"] = costs[len(costs) // 2]
    say("attention kernels")
    try:
        out.update(kernel_factors(out, repeat=5))
    except Exception as e:  # a kernel that cannot run here leaves the cost model's figures uncorrected
        logger.warning("calibration: could not time the attention kernels (%s: %s)", type(e).__name__, e)
    return out


def factor_kernels() -> tuple[tuple[str, str | None, str | None, Callable[[int], dict]], ...]:
    """(cost-model cascade, its form, the kernel that runs it on this CPU, parameters at length n) to time.

    The baseline's fused kernel, eager three-pass attention (no kernel of ours: the original as a model
    writes it), and every variant whose record says how to time it (``KernelVariant.timing``).
    """
    from codegen.registry import exact_variant, kernel_variants
    base = exact_variant()
    rows = [(base.name, "online", base.name, base.timing or (lambda n: {})), (base.name, "3pass", None, lambda n: {})]
    rows += [(r.name, None, r.name, r.timing) for r in kernel_variants().values()
             if r.timing is not None and r is not base]
    return tuple(rows)


#: the lengths each kernel is timed at: one long, where the work dominates, and one short, where the
#: per-call costs (block selection, the library calls around the kernel, threading) are a large share
FACTOR_LENGTHS = (2048, 256)


def factor_key(cascade: str, form: str | None, short: bool = False) -> str:
    """The profile field holding a cascade's measured-over-predicted time (``factor_dense_3pass``)."""
    return f"factor_{cascade}" + (f"_{form}" if form == "3pass" else "") + ("_short" if short else "")


def predicted_key(cascade: str, form: str | None, short: bool = False) -> str:
    """The profile field holding the cost model's uncorrected seconds at the shape a factor was timed at."""
    return "predicted_" + factor_key(cascade, form, short)[len("factor_"):]


def kernel_factors(measured: dict, repeat: int = 5) -> dict[str, float]:
    """Time the kernels this CPU runs at two causal shapes and return measured / predicted per cascade.

    The cost model counts the work; how well a particular CPU kernel turns work into time (vector width,
    library calls, passes it makes that the cascade does not model) is what these timings measure.
    Pricing multiplies the cascade's time by the factor, interpolated between the two shapes by the
    predicted time (so per-call costs weigh as much as they do at short lengths).
    """
    from codegen import ops
    from cost_model.predict import predict

    hw = hardware.cpu_from_measurements(measured, source="calibrating")
    out: dict[str, float] = {}
    for n in FACTOR_LENGTHS:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 8, n, 64, generator=g) for _ in range(3))
        shape = dict(B=1, H=8, G=8, P=n, M=n, E=64, F=64)
        hide = torch.ones(n, n, dtype=torch.bool).triu(1)
        short = n != FACTOR_LENGTHS[0]

        def eager(q=q, k=k, v=v, hide=hide) -> torch.Tensor:
            return (q @ k.transpose(-1, -2) * 0.125).masked_fill_(hide, float("-inf")).softmax(-1) @ v

        for cascade, form, variant, make in factor_kernels():
            params = make(n)
            fn = eager if variant is None else (
                lambda var=variant, p=params, q=q, k=k, v=v: ops.run(var, q, k, v, None, None, True, **p))
            seconds = _best(fn, repeat=repeat if not short else 3 * repeat)  # its first call builds a kernel
            predicted = predict(cascade, shape, hw, causal=True, form=form, **params).seconds
            # unbounded here: a factor outside FACTOR_BOUNDS fails the calibration rather than being clamped
            out[factor_key(cascade, form, short)] = seconds / predicted
            out[predicted_key(cascade, form, short)] = predicted
    return out


def is_generic(hw: hardware.Hardware) -> bool:
    """True when a profile's figures are the generic defaults, not measured on this machine."""
    return hw.source.startswith("generic")


def ensure_calibrated(progress: Callable[[str], None] | None = None) -> tuple[hardware.Hardware, bool]:
    """This CPU's cached profile, or a quick measurement (seconds) cached now; returns (profile, measured_now).

    A refused measurement caches nothing: the profile returned is the last good one or the generic
    figures, and its ``note`` says why.
    """
    if hardware.cache_path().exists():
        hw = hardware.cpu_profile()
        if not is_generic(hw):
            return hw, False
    if _REFUSED.get(str(hardware.cache_path())) is not None:  # refused once in this process: do not wait again
        return _REFUSED[str(hardware.cache_path())], False
    hw = hardware.cpu_profile(refresh=True, measure=lambda: measure(quick=True, progress=progress))
    if hw.note:
        _REFUSED[str(hardware.cache_path())] = hw
    return hw, not hw.note


_REFUSED: dict[str, hardware.Hardware] = {}


def auto_calibrate() -> bool:
    """Whether the Python API may calibrate this CPU on first use (``ATTENTION_REWRITER_CALIBRATE=0``: never)."""
    return os.environ.get("ATTENTION_REWRITER_CALIBRATE", "1") != "0"


def calibrate(force: bool = False, threads: int | None = None, quick: bool = False) -> hardware.Hardware:
    """Return this CPU's profile, measuring (and caching) it if absent or forced."""
    hw = hardware.cpu_profile(refresh=force, measure=lambda: measure(threads, quick=quick))
    measured_threads = dict(hw.extra).get("threads")
    if threads and measured_threads is not None and int(measured_threads) != threads:
        logger.info("cached profile was measured with %s threads; re-measuring with %s", measured_threads, threads)
        hw = hardware.cpu_profile(refresh=True, measure=lambda: measure(threads, quick=quick))
    return hw


def main(argv: list[str] | None = None) -> int:
    """CLI: measure this CPU and print the cached profile."""
    ap = argparse.ArgumentParser(prog="python -m codegen.hw_calibrate", description=__doc__)
    ap.add_argument("--force", action="store_true", help="re-measure even if a cached profile exists")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while measuring")
    ap.add_argument("--quick", action="store_true", help="a few seconds: fewer repetitions, smaller probes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hw = calibrate(force=args.force, threads=args.threads, quick=args.quick)
    print(json.dumps(hardware.as_dict(hw), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
