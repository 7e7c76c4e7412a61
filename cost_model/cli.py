"""Command line: ``python -m cost_model explain VARIANT --shape B=1,H=8,... [--json]``."""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from typing import Sequence

import sympy

from . import hardware
from .analysis import footprint, op_counts, passes
from .cascades import CASCADES, FORMS, PARAMS, known
from .predict import SHAPE_KEYS, cascade_for, crossovers, predict

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A user mistake on the command line (exit code 2)."""


def parse_shape(text: str) -> dict[str, int]:
    """Parse ``B=1,H=8,G=8,P=4096,M=4096,E=64,F=64`` (G defaults to H, F to E)."""
    shape: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, val = item.partition("=")
        key = key.strip().upper()
        if not sep or not key or not val.strip():
            raise UsageError(f"malformed shape item {item!r}: expected KEY=INTEGER, e.g. P=4096")
        if key not in SHAPE_KEYS:
            raise UsageError(f"unknown shape key {key!r}; expected some of {','.join(SHAPE_KEYS)}")
        try:
            n = int(val)
        except ValueError:
            raise UsageError(f"shape {key}={val!r} is not an integer") from None
        if n < 1:
            raise UsageError(f"shape {key}={n} must be positive")
        if key in shape:
            raise UsageError(f"shape key {key} given twice")
        shape[key] = n
    shape.setdefault("G", shape.get("H", 0))
    shape.setdefault("F", shape.get("E", 0))
    missing = [k for k in SHAPE_KEYS if not shape.get(k)]
    if missing:
        raise UsageError(f"shape is missing {','.join(missing)} (give B,H,G,P,M,E,F)")
    if shape["H"] % shape["G"]:
        raise UsageError(f"H={shape['H']} is not a multiple of G={shape['G']}")
    return shape


def parse_params(variant: str, items: Sequence[str]) -> dict[str, object]:
    """Parse ``--param k=v`` items against the variant's parameter types."""
    allowed = PARAMS[variant]
    out: dict[str, object] = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"malformed --param {item!r}: expected NAME=VALUE")
        if key not in allowed:
            raise UsageError(f"variant {variant!r} has no parameter {key!r}; it takes: "
                             f"{', '.join(allowed) or 'none'}")
        try:
            out[key] = allowed[key](val)
        except ValueError:
            raise UsageError(f"parameter {key}={val!r} is not a valid {allowed[key].__name__}") from None
    return out


EXAMPLES = {"window": 256, "sinks": 4, "keep": 0.125, "rank": 16, "groups": 2, "chunk": 64, "block": 64}


def check_required(variant: str, params: dict[str, object], flag: str = "--param ") -> None:
    """Raise a UsageError up front for parameters the variant's cascade cannot be sized without."""
    sig = inspect.signature(CASCADES[variant]).parameters
    # a parameter whose builder default is None stays a free symbol (W, R, ...) that no shape sizes
    need = [p for p in PARAMS[variant] if p in sig and sig[p].default is None and p not in params]
    if need:
        hint = " ".join(f"{flag}{p}={EXAMPLES.get(p, 1)}" for p in need)
        raise UsageError(f"variant {variant!r} needs {', '.join(need)}: add {hint}")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _human_bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.4g} {unit}"
        x /= 1024
    return f"{x:.4g}"


def explain(args: argparse.Namespace) -> int:
    """The explain subcommand."""
    if args.variant not in known():
        raise UsageError(f"unknown variant {args.variant!r}; known: {', '.join(known())}")
    shape = parse_shape(args.shape)
    params = parse_params(args.variant, args.param or [])
    check_required(args.variant, params)
    try:
        hw = hardware.get(args.hw)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    c = cascade_for(args.variant, hw, causal=args.causal, form=args.form, **params)
    pred = predict(args.variant, shape, hw, causal=args.causal, form=args.form, **params)
    if args.json:
        print(json.dumps({
            "variant": args.variant, "hardware": hw.name, "shape": shape, "params": params,
            "causal": args.causal, "passes": pred.passes,
            "flops": {"mac": pred.macs, "exp": pred.exps, "other": pred.others,
                      "total": 2 * pred.macs + pred.exps + pred.others},
            "bytes": pred.bytes, "footprint": pred.footprint, "seconds": pred.seconds,
            "kernels": [{"name": n, "seconds": s} for n, s in pred.kernels],
        }, indent=2))
        return 0
    oc = op_counts(c)
    print(f"variant {args.variant} on {hw.name} ({hw.schedule} schedule; {hw.source})")
    print(c)
    print(f"passes over the keys (derived): {passes(c)}")
    print("symbolic counts:")
    print(f"  multiply-adds  {sympy.factor(oc.macs)}")
    print(f"  exponentials   {sympy.factor(oc.exps)}")
    print(f"  other ops      {sympy.factor(oc.others)}")
    print(f"  footprint      {footprint(c, hw.dtype_bytes)} bytes")
    print("at " + ",".join(f"{k}={shape[k]}" for k in SHAPE_KEYS) +
          (" " + " ".join(f"{k}={v}" for k, v in params.items()) if params else "") + ":")
    print(f"  FLOPs by class: mac {_fmt(pred.macs)} (= {_fmt(2 * pred.macs)} FLOPs), exp {_fmt(pred.exps)}, "
          f"other {_fmt(pred.others)}")
    print(f"  bytes to/from main memory: {_fmt(pred.bytes)} ({_human_bytes(pred.bytes)})")
    print(f"  peak intermediate footprint: {_human_bytes(pred.footprint)}")
    for name, secs in pred.kernels:
        print(f"  kernel {name:<12} {secs:.4g} s")
    print(f"  predicted seconds: {pred.seconds:.4g}")
    return 0


def crossover(args: argparse.Namespace) -> int:
    """The crossover subcommand: lengths N where the cheapest variant changes."""
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        if v not in known():
            raise UsageError(f"unknown variant {v!r}; known: {', '.join(known())}")
    shape = parse_shape(args.shape + ",P=1,M=1")
    shape.pop("P")
    shape.pop("M")
    params: dict[str, dict[str, object]] = {v: {} for v in names}
    for item in args.param or []:
        v, sep, kv = item.partition(":")
        if not sep or v not in params:
            raise UsageError(f"malformed --param {item!r}: expected VARIANT:NAME=VALUE")
        params[v].update(parse_params(v, [kv]))
    for v in names:
        check_required(v, params[v], flag=f"--param {v}:")
    try:
        hw = hardware.get(args.hw)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    found = crossovers(params, shape, hw, causal=args.causal, lo=args.min, hi=args.max)
    if args.json:
        print(json.dumps([{"n": c.n, "before": c.before, "after": c.after} for c in found], indent=2))
        return 0
    if not found:
        print("no crossover in range")
    for c in found:
        print(f"N = {c.n:.0f}: {c.before} -> {c.after}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m cost_model``."""
    ap = argparse.ArgumentParser(prog="python -m cost_model", description="Einsum-cascade cost model.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print a variant's cascade, derived passes, counts and predicted time")
    ex.add_argument("variant")
    ex.add_argument("--param", action="append", metavar="NAME=VALUE", help="variant parameter (repeatable)")
    ex.add_argument("--shape", required=True, help="B=1,H=8,G=8,P=4096,M=4096,E=64,F=64")
    ex.add_argument("--hw", default="cpu", help="cpu | h100 | h200 | a100")
    ex.add_argument("--causal", action="store_true")
    ex.add_argument("--form", choices=FORMS, default=None, help="softmax form (default: the variant's)")
    ex.add_argument("--json", action="store_true", help="one JSON object with passes, flops, bytes, seconds")
    ex.set_defaults(func=explain)
    cx = sub.add_parser("crossover", help="sequence lengths where the cheapest variant changes")
    cx.add_argument("--variants", required=True, help="comma-separated variant names")
    cx.add_argument("--param", action="append", metavar="VARIANT:NAME=VALUE")
    cx.add_argument("--shape", required=True, help="B=1,H=8,G=8,E=64,F=64 (P = M = N)")
    cx.add_argument("--hw", default="cpu")
    cx.add_argument("--causal", action="store_true")
    cx.add_argument("--min", type=float, default=64)
    cx.add_argument("--max", type=float, default=1 << 20)
    cx.add_argument("--json", action="store_true")
    cx.set_defaults(func=crossover)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for usage errors)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a size the shape does not give: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
