"""Hardware profiles: GPU datasheet figures and a measured, cached CPU profile."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import sympy

logger = logging.getLogger(__name__)

_P, _M = sympy.symbols("P M", positive=True, integer=True)


@dataclass(frozen=True)
class Hardware:
    """Throughputs and capacities that turn op counts and bytes into seconds.

    ``overlap_units``: GPU tensor cores, SFUs and ALUs run concurrently, so compute time
    is the largest class; CPU cores issue every class from the same vector units, so the
    classes add up.  ``schedule`` is how the variants run there (``fused`` Triton kernels
    or ``eager`` library calls); ``tile_q``/``tile_k`` are the fused attention kernel's
    tiles (sympy expressions of P and M allowed).
    """

    name: str
    mac_per_s: float
    exp_per_s: float
    other_per_s: float
    read_bytes_per_s: float
    write_bytes_per_s: float
    launch_s: float
    onchip_bytes: float
    cache_bytes: float
    cache_bytes_per_s: float
    dtype_bytes: int
    overlap_units: bool
    schedule: str
    tile_q: str = "64"
    tile_k: str = "64"
    source: str = "datasheet"
    extra: tuple[tuple[str, float], ...] = field(default=())
    #: rates of element ops run as separate library calls on attention-sized tensors (fresh
    #: outputs, data in cache rather than registers); None: the in-kernel rates apply
    eager_exp_per_s: float | None = None
    eager_other_per_s: float | None = None
    eager_mac_per_s: float | None = None
    #: measured library-matmul rates by block shape: ((m, n, k, mac/s), ...)
    gemm_table: tuple[tuple[float, float, float, float], ...] = ()
    #: why these figures and not a fresh measurement (a refused calibration); '' when nothing to say
    note: str = ""

    def gemm_rate(self, m: float, n: float, k: float) -> float:
        """MAC/s of a library matmul with blocks (m x k) @ (k x n): the nearest measured shape."""
        if not self.gemm_table:
            return self.eager_mac_per_s or self.mac_per_s

        def dist(row: tuple[float, float, float, float]) -> float:
            return sum(abs(math.log(max(a, 1.0) / max(b, 1.0))) for a, b in zip((m, n, k), row[:3]))

        return min(self.gemm_table, key=dist)[3]

    def rates(self, fused: bool) -> tuple[float, float, float]:
        """(mac/s, exp/s, other/s) for a fused kernel or an eager library call."""
        if fused:
            return self.mac_per_s, self.exp_per_s, self.other_per_s
        return (self.eager_mac_per_s or self.mac_per_s, self.eager_exp_per_s or self.exp_per_s,
                self.eager_other_per_s or self.other_per_s)

    def tiles(self) -> tuple[sympy.Expr, sympy.Expr]:
        """The fused attention kernel's (query, key) tiles as sympy expressions of P and M."""
        loc = {"P": _P, "M": _M, "Piecewise": sympy.Piecewise, "Min": sympy.Min}
        return sympy.sympify(self.tile_q, locals=loc), sympy.sympify(self.tile_k, locals=loc)


# Datasheet figures, dense fp16/bf16.  exp: 16 SFU ops/clk/SM; other: fp32 FMA pipes.
H100 = Hardware("h100", mac_per_s=989.4e12 / 2, exp_per_s=16 * 132 * 1.83e9, other_per_s=67e12 / 2,
                read_bytes_per_s=3.35e12, write_bytes_per_s=3.35e12, launch_s=4e-6, onchip_bytes=228e3,
                cache_bytes=50e6, cache_bytes_per_s=10e12, dtype_bytes=2, overlap_units=True, schedule="fused",
                tile_q="128",
                tile_k="64")
H200 = Hardware("h200", mac_per_s=989.4e12 / 2, exp_per_s=16 * 132 * 1.83e9, other_per_s=67e12 / 2,
                read_bytes_per_s=4.8e12, write_bytes_per_s=4.8e12, launch_s=4e-6, onchip_bytes=228e3,
                cache_bytes=50e6, cache_bytes_per_s=10e12, dtype_bytes=2, overlap_units=True, schedule="fused",
                tile_q="128",
                tile_k="64")
A100 = Hardware("a100", mac_per_s=312e12 / 2, exp_per_s=16 * 108 * 1.41e9, other_per_s=19.5e12 / 2,
                read_bytes_per_s=2.039e12, write_bytes_per_s=2.039e12, launch_s=5e-6, onchip_bytes=164e3,
                cache_bytes=40e6, cache_bytes_per_s=5e12, dtype_bytes=2, overlap_units=True, schedule="fused",
                tile_q="128",
                tile_k="64")

#: torch's CPU flash-attention kernel splits queries by 256/64/32 rows and keys by 512.
CPU_TILE_Q = "Piecewise((256, P >= 768), (64, P >= 192), (32, True))"
CPU_TILE_K = "Min(512, M)"

#: Used only when no calibration exists: a conservative 2-core AVX2 machine.
GENERIC_CPU = dict(mac_per_s=50e9, exp_per_s=2e9, other_per_s=2e9, read_bytes_per_s=10e9,
                   write_bytes_per_s=4e9, cache_bytes_per_s=40e9, launch_s=8e-6)

#: Measured fields of a CPU profile (what a calibration must return).
MEASURED_FIELDS = ("mac_per_s", "exp_per_s", "other_per_s", "read_bytes_per_s", "write_bytes_per_s",
                   "cache_bytes_per_s", "launch_s")


class CalibrationRefused(RuntimeError):
    """A calibration whose figures cannot be trusted (other work on the cores, uneven repeats, a factor at
    its bound): nothing is cached, and the reasons say why."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


def machine_id() -> str:
    """A short stable identity of this machine (host, CPU model, core count, machine-id)."""
    parts = [platform.node(), platform.machine(), str(os.cpu_count())]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                parts.append(line.split(":", 1)[1].strip())
                break
    except OSError:
        parts.append(platform.processor())
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            parts.append(Path(p).read_text().strip())
            break
        except OSError:
            continue
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def cache_path() -> Path:
    """Where this machine's measured CPU profile is cached."""
    root = Path(os.environ.get("ATTENTION_REWRITER_CACHE", Path.home() / ".cache" / "attention-rewriter"))
    return root / f"hw-{machine_id()}.json"


def _cpu_caches() -> tuple[float, float]:
    """(per-core L2 bytes, last-level cache bytes) from sysfs; fallbacks if unreadable."""
    l2, llc = 1 << 20, 32 << 20
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    found: list[int] = []
    try:
        for idx in sorted(base.glob("index*")):
            level = int((idx / "level").read_text())
            kind = (idx / "type").read_text().strip()
            text = (idx / "size").read_text().strip()
            size = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1) if text[-1].isalpha() else int(text)
            if kind == "Instruction":
                continue
            if level == 2:
                l2 = size
            if level >= 2:
                found.append(size)
    except (OSError, ValueError):
        logger.debug("cache sizes unreadable; using defaults")
    if found:
        llc = max(found)
    return float(l2), float(llc)


def cpu_from_measurements(measured: Mapping[str, float], source: str = "measured") -> Hardware:
    """Build the CPU profile from measured throughputs (keys: MEASURED_FIELDS)."""
    missing = [k for k in MEASURED_FIELDS if k not in measured]
    if missing:
        raise ValueError(f"calibration is missing {missing}")
    l2, llc = _cpu_caches()
    optional = ("eager_exp_per_s", "eager_other_per_s", "eager_mac_per_s")
    extra = tuple((k, float(v)) for k, v in measured.items()
                  if k not in MEASURED_FIELDS + optional + ("gemm_table",))
    table = tuple(tuple(float(x) for x in row) for row in measured.get("gemm_table", ()))
    cores = max(1, int(measured.get("threads", os.cpu_count() or 1)))
    # a CPU core's tiles are backed by its L2 and its share of the last-level cache, which is
    # what stands between it and DRAM (the role shared memory plays on a GPU)
    return Hardware("cpu", **{k: float(measured[k]) for k in MEASURED_FIELDS},
                    onchip_bytes=max(l2, llc / cores), cache_bytes=llc, dtype_bytes=4, overlap_units=False,
                    schedule="eager",
                    tile_q=CPU_TILE_Q, tile_k=CPU_TILE_K, source=source, extra=extra, gemm_table=table,
                    **{k: float(measured[k]) for k in optional if k in measured})


def cpu_profile(refresh: bool = False, measure: Callable[[], Mapping[str, float]] | None = None) -> Hardware:
    """This CPU's profile: cached measurement, re-measured with ``measure`` when asked or missing.

    ``measure`` runs the micro-benchmarks (``codegen.hw_calibrate.measure`` does, with torch)
    and returns a mapping with MEASURED_FIELDS.  Without a cache or a ``measure`` the
    generic figures are used and a warning says how to calibrate.
    """
    path = cache_path()
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
            return cpu_from_measurements(data["measured"], source=f"measured {data.get('when', '?')} ({path})")
        except (ValueError, KeyError, OSError) as exc:
            logger.warning("ignoring unreadable CPU profile %s: %s", path, exc)
    if measure is None:
        logger.warning("no CPU calibration cached at %s; using generic figures "
                       "(run `python -m codegen.hw_calibrate` to measure this machine)", path)
        return cpu_from_measurements(GENERIC_CPU, source="generic (uncalibrated)")
    try:
        measured = dict(measure())
    except CalibrationRefused as exc:
        return _fallback(path, str(exc))
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_id(), "when": when, "measured": measured}, indent=2))
    logger.info("CPU profile measured and cached at %s", path)
    return cpu_from_measurements(measured, source=f"measured {when} ({path})")


def _fallback(path: Path, why: str) -> Hardware:
    """The last good cached profile, or the generic figures, after a refused calibration (nothing is written)."""
    import dataclasses

    if path.exists():
        try:
            data = json.loads(path.read_text())
            hw = cpu_from_measurements(data["measured"], source=f"measured {data.get('when', '?')} ({path})")
            logger.warning("CPU calibration refused (%s); keeping the profile measured %s", why, data.get("when", "?"))
            return dataclasses.replace(hw, note=f"a new CPU calibration was refused ({why}); predictions use the "
                                                f"profile measured {data.get('when', '?')}")
        except (ValueError, KeyError, OSError):
            pass
    logger.warning("CPU calibration refused (%s); nothing cached, using generic figures", why)
    return dataclasses.replace(cpu_from_measurements(GENERIC_CPU, source="generic (calibration refused)"),
                               note=f"the CPU calibration was refused ({why}), so nothing was cached; predictions use "
                                    "generic CPU figures: run `python -m codegen.hw_calibrate --force` "
                                    "on a quiet machine")


def profile_note(hw: Hardware) -> str:
    """One line for a plan when its CPU figures are not a trusted measurement of this machine ('' when they are)."""
    if hw.note:
        return hw.note
    if hw.source.startswith("generic"):
        return "predictions use generic CPU figures (uncalibrated): run `python -m codegen.hw_calibrate --quick`"
    return ""


PROFILES: dict[str, Callable[[], Hardware]] = {
    "h100": lambda: H100,
    "h200": lambda: H200,
    "a100": lambda: A100,
    "cpu": cpu_profile,
}


def get(name: str) -> Hardware:
    """Return a hardware profile by name (cpu, h100, h200, a100)."""
    try:
        return PROFILES[name.lower()]()
    except KeyError:
        raise KeyError(f"unknown hardware {name!r}; known: {', '.join(PROFILES)}") from None


def as_dict(hw: Hardware) -> dict[str, object]:
    """The profile as a JSON-ready dict."""
    return asdict(hw)
