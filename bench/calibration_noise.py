"""Can a busy machine corrupt the CPU calibration? A quiet calibration against one made beside a spinning process.

    python bench/calibration_noise.py [--quick] [--spinners 1]

Calibrates into an empty cache on the quiet machine, then again (into another empty cache) while
``--spinners`` processes each spin on one core. Passes when the contended calibration either caches
nothing and says why, or caches figures all within 1.5x of the quiet ones. Prints one row per figure.
Run it with nothing else running (``uptime`` shows the load).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIMIT = 1.5


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def _calibrate(cache: str, quick: bool) -> tuple[dict | None, str, float]:
    """(cached measured figures or None, the profile's note, seconds) for a calibration into ``cache``."""
    os.environ["ATTENTION_REWRITER_CACHE"] = cache
    from codegen import hw_calibrate
    from cost_model import hardware

    hw_calibrate._REFUSED.clear()
    t0 = time.perf_counter()
    hw = hw_calibrate.calibrate(force=True, quick=quick)
    took = time.perf_counter() - t0
    path = hardware.cache_path()
    return (json.loads(path.read_text())["measured"] if path.exists() else None), hw.note, took


def main() -> None:
    """Print the quiet and contended figures and whether the contended calibration was caught."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick calibration the API runs on first use")
    ap.add_argument("--spinners", type=int, default=1)
    args = ap.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f}; cores {os.cpu_count()}; "
          f"{'quick' if args.quick else 'full'} calibration")
    quiet, note, t_quiet = _calibrate(tempfile.mkdtemp(prefix="cal-quiet-"), args.quick)
    print(f"quiet calibration: {'cached' if quiet else 'refused: ' + note} ({t_quiet:.0f} s)")
    if quiet is None:
        print("the quiet calibration was refused: run again on a quiet machine")
        raise SystemExit(1)
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.spinners)]
    for p in procs:
        p.start()
    try:
        busy, note, t_busy = _calibrate(tempfile.mkdtemp(prefix="cal-busy-"), args.quick)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
    print(f"with {args.spinners} spinning process(es): {'cached' if busy else 'nothing cached'} ({t_busy:.0f} s)")
    if busy is None:
        print(f"  why: {note}")
        print("PASS: the contended calibration cached nothing and said why")
        return
    worst = 1.0
    print(f"{'figure':<22} {'quiet':>12} {'busy':>12} {'ratio':>7}")
    for key, q in quiet.items():
        b = busy.get(key)
        if not isinstance(q, (int, float)) or not isinstance(b, (int, float)) or q <= 0 or b <= 0:
            continue
        r = b / q
        if key.endswith(("_per_s", "_s")) or key.startswith("factor_"):
            worst = max(worst, r, 1 / r)
        print(f"{key:<22} {q:>12.4g} {b:>12.4g} {r:>6.2f}x")
    print(f"{'PASS' if worst <= LIMIT else 'FAIL'}: every cached figure within {worst:.2f}x of quiet (limit {LIMIT}x)")


if __name__ == "__main__":
    main()
