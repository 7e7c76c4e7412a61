"""Command line of the attention rewriter.

  rewriter optimize   rewrite a model's attention inside an error budget, measure it, export an artifact
                      (no arguments: the project's own trained byte-level LM at its 1024-byte context)
  rewriter find       list a model's attention sites
  rewriter inspect    print an artifact's plan, provenance and kernel hashes
  rewriter explain    each site's candidates: cascade, passes, FLOPs, bytes, predicted time, crossovers
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

EXIT_USAGE = 2

#: the planner's default per-site cap (passes.planner.DEFAULT_SITE_CAP; kept here so --help loads no torch)
DEFAULT_SITE_CAP = 0.3
#: passes.pricing.TARGETS, for the same reason
TARGETS = ("cpu", "cuda", "h100", "h200", "a100")


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + traceback-looking text
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_budget(text: str) -> Optional[float]:
    """'none' (no accuracy gate) or a number >= 0; same meaning as ``optimize(budget=...)``."""
    if text.strip().lower() in ("none", "off", "no"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--budget {text!r} is not a number; give the largest output error allowed (e.g. 0.05) "
                         "or 'none' for no accuracy gate") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--budget {text} must be a finite number >= 0 (or 'none' for no accuracy gate)")
    return value


def parse_cap(text: str) -> Optional[float]:
    """'none' (no per-site cap) or a number > 0; same meaning as ``optimize(site_cap=...)``."""
    if text.strip().lower() in ("none", "off", "no"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--site-cap {text!r} is not a number; give the largest site error allowed (e.g. 0.3) "
                         "or 'none'") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--site-cap {text} must be a finite number > 0 (or 'none')")
    return value


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word (feature_map=hedgehog)


def parse_variants(text: Optional[str]):
    """'dense' | 'a,b' | 'sliding_window:window=256;linear:chunk=64' -> the ``variants=`` argument, validated."""
    if not text:
        return None
    out: dict[str, Optional[dict]] = {}
    for item in filter(None, (t.strip() for t in text.replace(";", "|").split("|"))):
        name, _, params = item.partition(":")
        names = [n.strip() for n in name.split(",") if n.strip()] if not params else [name.strip()]
        kv: dict[str, Any] = {}
        for p in filter(None, (x.strip() for x in params.split(","))):
            key, sep, val = p.partition("=")
            if not sep or not key.strip() or not val.strip():
                raise UsageError(f"--variants: malformed parameter {p!r} of {name.strip()!r}; expected NAME=VALUE, "
                                 "e.g. sliding_window:window=256")
            kv[key.strip()] = _value(val.strip())
        for n in names:
            out[n] = kv or None
    spec = list(out) if all(v is None for v in out.values()) else out
    from passes.planner import normalise_variants
    try:
        normalise_variants(spec)  # names and parameter values checked now, not inside the op at run time
    except (TypeError, ValueError) as e:
        raise UsageError(f"--variants: {e}") from None
    return spec


def _progress():
    """A stage printer: one line per step with elapsed seconds (tqdm keeps bars from other steps intact)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()

    def say(msg: str) -> None:
        tqdm.write(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr)

    return say


def _calibrate_cpu(say) -> None:
    """Measure this CPU quickly on first use so the plan's times are not generic figures."""
    from codegen import hw_calibrate
    from cost_model import hardware
    from passes import pricing
    if hardware.cache_path().exists():
        return
    say(f"first use on this machine: calibrating the CPU profile (a few seconds; cached at {hardware.cache_path()})")
    try:
        hw, _ = hw_calibrate.ensure_calibrated(progress=lambda m: say(f"  calibrating: {m}"))
    except Exception as e:  # a failed measurement must not stop the run: the plan says it is uncalibrated
        say(f"CPU calibration failed ({type(e).__name__}: {e}); predictions use generic figures")
        return
    pricing.profile.cache_clear()
    say(f"CPU profile: {hw.note or hw.source}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lm",
                   help="lm (default: the project's trained byte-level LM), rope-lm (its rotary GQA Llama-shaped LM), "
                        "minilm, minilm-sdpa, module:function, "
                        "file.py:function (returning (model, example_inputs)), or a Hugging Face model directory")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of the example inputs")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")


def build_parser() -> argparse.ArgumentParser:
    """The ``rewriter`` argument parser."""
    ap = _Parser(prog="rewriter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    f = sub.add_parser("find", help="list attention sites")
    _add_model_args(f)
    o = sub.add_parser("optimize", help="plan, rewrite, measure and export")
    _add_model_args(o)
    o.add_argument("--budget", default="0.01",
                   help="largest model error allowed, measured by --metric (default 0.01: +1%% perplexity for the "
                        "project's LM), or 'none' for no gate")
    o.add_argument("--metric", choices=("auto", "l2", "kl", "cosine", "perplexity"), default=None,
                   help="what the budget measures (default: perplexity for the project's LM; otherwise auto, "
                        "chosen from what the model returns: kl for a causal LM's logits, cosine for pooled "
                        "embeddings, relative l2 over non-padded positions for the rest)")
    o.add_argument("--site-cap", default=str(DEFAULT_SITE_CAP),
                   help="largest error any one approximate site may have (relative L2 of its attention output), "
                        f"or 'none' (default {DEFAULT_SITE_CAP:g})")
    o.add_argument("--variants", default=None,
                   help="restrict or pin variants: 'dense', 'dense,sliding_window', 'sliding_window:window=256'")
    o.add_argument("--target", choices=TARGETS, default=None,
                   help="default: the inputs' device; a GPU name prices for its datasheet profile")
    o.add_argument("--out", default="artifacts/tiny-lm", help="artifact directory (default artifacts/tiny-lm); "
                   "'none' to skip export")
    o.add_argument("--reps", type=int, default=10, help="timed repetitions per model (after 2 warm-ups)")
    o.add_argument("--no-report", action="store_true", help="skip report.md and its plot")
    i = sub.add_parser("inspect", help="print an artifact's plan, provenance and kernel hashes")
    i.add_argument("path")
    e = sub.add_parser("explain", help="price every candidate at each site and show where the cheapest changes")
    _add_model_args(e)
    e.add_argument("--target", choices=TARGETS, default="cpu")
    e.add_argument("--max-len", type=int, default=None, help="longest length for crossovers (default 16x the site's)")
    e.add_argument("--variants", default=None, help="only these variants (default: every one that applies)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``rewriter`` command; returns the exit code (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "inspect":
            from rewriter.artifact import ArtifactError, describe
            try:
                print(describe(args.path))
            except ArtifactError as e:
                raise UsageError(str(e)) from None
            return 0
        return _run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _check_out(text: str) -> Optional[Path]:
    if text.strip().lower() == "none":
        return None
    out = Path(text)
    if out.is_file():
        raise UsageError(f"--out {out} is an existing file; give a directory path for the artifact")
    if out.is_dir() and any(out.iterdir()) and not ((out / "plan.json").exists() or (out / "pipeline.json").exists()):
        raise UsageError(f"--out {out} is a non-empty directory that is not an artifact; refusing to replace it")
    return out


def _load_model(args) -> tuple[Any, Any]:
    from rewriter import models
    if args.seq_len is not None and args.seq_len < 2:
        raise UsageError(f"--seq-len {args.seq_len} must be at least 2")
    try:
        return models.from_spec(args.model, seq_len=args.seq_len)
    except models.ModelSpecError as e:
        raise UsageError(str(e)) from None


def _run(args) -> int:
    from passes.capture import CaptureError  # imported here: usage errors come back before torch loads

    budget = parse_budget(args.budget) if args.cmd == "optimize" else None
    cap = parse_cap(args.site_cap) if args.cmd == "optimize" else None
    variants = parse_variants(args.variants) if args.cmd == "optimize" else None
    out = _check_out(args.out) if args.cmd == "optimize" else None
    say = _progress()
    if args.cmd == "optimize" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_distributed(args, budget, variants, out, say, cap)
    say(f"loading model {args.model!r}")
    model, inputs = _load_model(args)
    try:
        if args.cmd == "find":
            from rewriter.api import find_attention
            sites = find_attention(model, inputs)
            print(f"{len(sites)} attention site(s) in {type(model).__name__}:")
            for s in sites:
                print("  " + s.describe())
            return 0
        if args.cmd == "explain":
            from rewriter.explain import explain_model
            if args.target == "cpu":
                _calibrate_cpu(say)
            names = parse_variants(args.variants)
            print(explain_model(model, inputs, target=args.target, max_len=args.max_len,
                                variants=None if names is None else list(names), progress=say))
            return 0
        return run_optimize(args, model, inputs, budget, variants, out, say, cap)
    except (CaptureError, ValueError, TypeError) as e:
        # errors the library raises about the user's model or arguments: one line, exit 2 (-v: traceback)
        if args.verbose:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {type(e).__name__}: {first} (run with -v for details)", file=sys.stderr)
        return EXIT_USAGE


def run_optimize(args, model, inputs, budget, variants, out: Optional[Path], say,
                 site_cap: Optional[float] = None) -> int:
    """``rewriter optimize``: plan, print, measure against the original, perplexity for the LM, export."""
    import torch

    from passes.capture import split_inputs
    from rewriter.api import optimize, relative_l2
    from rewriter.report import time_interleaved, write_report

    target = args.target or "cpu"
    if target == "cpu":
        _calibrate_cpu(say)
    is_lm = args.model in ("lm", "default", "tiny-lm", "rope-lm", "rope_lm")
    metric = args.metric or ("perplexity" if is_lm else "auto")
    if budget is not None:
        say(f"budget {budget:g} in {metric} terms" + (f": perplexity may rise {100 * budget:g}%"
                                                       if metric == "perplexity" else ""))
    t0 = time.perf_counter()
    opt = optimize(model, inputs, budget=budget, metric=None if metric == "auto" else metric, variants=variants,
                   target=args.target, progress=say, site_cap=site_cap)
    say(f"planned in {time.perf_counter() - t0:.1f}s")
    print()
    print(opt.plan)
    print()
    a, k = split_inputs(inputs)
    shapes = ", ".join(f"{n}{list(t.shape)}" for n, t in opt.spec.bind(a, k).items() if isinstance(t, torch.Tensor))
    say(f"measuring optimized against the original on {shapes} ({args.reps} interleaved reps after 2 warm-ups)")
    with torch.no_grad():
        err = relative_l2(model(*a, **k), opt(*a, **k))
    t = time_interleaved({"original": lambda: model(*a, **k), "optimized": lambda: opt(*a, **k)}, reps=args.reps)
    speed = t["original"].median / t["optimized"].median
    measured: dict[str, str] = {
        "inputs": shapes,
        "original (eager) per call": str(t["original"]),
        "optimized per call": str(t["optimized"]),
        "end-to-end speedup (median over median)": f"{speed:.2f}x",
        "output error vs original (relative L2)": f"{err:.2e}",
    }
    if is_lm:
        from rewriter import lm
        n = int(next(iter(opt.spec.bind(a, k).values())).shape[1])
        say(f"held-out perplexity on 8 windows of {n} bytes (standard-library docstrings the planner never saw)")
        held = lm.windows(lm.corpus("heldout"), n, 8, seed=1)
        p0, p1 = (lm.perplexity(model, held, chunk=int(a[0].shape[0])),
                  lm.perplexity(opt, held, chunk=int(a[0].shape[0])))
        measured["held-out perplexity (per byte)"] = f"{p0:.4f} -> {p1:.4f} ({100 * (p1 / p0 - 1):+.2f}%)"
    for key, val in measured.items():
        print(f"{key}: {val}")
    print("(timings on this machine; a shared or busy CPU widens the spread)")
    if out is not None:
        from rewriter.artifact import export
        extra = None
        if not args.no_report:
            def extra(tmp: Path) -> None:
                say("writing report.md (measuring attention time by length, about 30 s)")
                write_report(opt, tmp, measured=measured)
        say(f"exporting to {out}")
        print(f"artifact: {export(opt, out, extra=extra)}" + ("" if args.no_report else " (with report.md)"))
    return 0


def run_distributed(args, budget, variants, out: Optional[Path], say, site_cap: Optional[float]) -> int:
    """``torchrun --nproc-per-node N -m rewriter optimize``: one pipeline stage per rank, one plan, one artifact."""
    import torch.distributed as dist

    from passes.capture import CaptureError
    from rewriter import distributed as D
    from rewriter import models

    D.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank:
        say = lambda msg: None  # noqa: E731  (one progress stream: rank 0's)
    try:
        target = args.target or "cpu"
        if target == "cpu" and rank == 0:
            _calibrate_cpu(say)  # once, before the other ranks load: a profile measured beside them is wrong
        dist.barrier()
        say(f"loading model {args.model!r} on {world} ranks (parameters on meta; each rank loads its stage)")
        try:
            model, inputs = models.from_spec(args.model, seq_len=args.seq_len, weights=False)
        except models.ModelSpecError as e:
            raise UsageError(str(e)) from None
        checkpoint = args.model if Path(args.model).is_dir() else None
        opt = D.optimize_distributed(model, inputs, budget=budget, metric=None if args.metric in (None, "auto")
                                     else args.metric, variants=variants, target=args.target, progress=say,
                                     site_cap=site_cap, checkpoint=checkpoint)
        if rank == 0:
            print()
            print(opt.plan)
            print()
        if out is not None:
            say(f"exporting to {out}")
            D.export_stages(opt, out)
            if rank == 0:
                print(f"artifact: {out} ({world} stages and {D.MANIFEST})")
        held = sum(t.numel() for t in opt.program.parameters())
        print(f"rank {rank}: peak RSS {D.peak_rss_mb():.0f} MB (stage {rank}: blocks "
              f"{opt.stage.blocks[0]}..{opt.stage.blocks[1] - 1}, {held:,} parameters)", flush=True)
        dist.barrier()
        return 0
    except (CaptureError, ValueError, TypeError) as e:
        if args.verbose:
            raise
        print(f"error: rank {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, dist.DistError) as e:  # a peer died or timed out: one line, never a hang
        if args.verbose:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: rank {rank}: the distributed run failed ({type(e).__name__}: {first}); another rank may have "
              "died: see its output", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
