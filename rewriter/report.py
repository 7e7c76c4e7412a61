"""Measured figures and a readable report: interleaved timings, attention time by length, report.md + plot."""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from passes.variants import VARIANTS, exact_name

logger = logging.getLogger(__name__)

PLOT = "attention_time.png"


@dataclass(frozen=True)
class Timing:
    """Wall time of one callable over repetitions: median with quartiles and range, in seconds."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    reps: int

    def __str__(self) -> str:
        return (f"{_ms(self.median)} (IQR {_ms(self.q1, unit=False)}-{_ms(self.q3)}, "
                f"range {_ms(self.low, unit=False)}-{_ms(self.high)}, n={self.reps})")


def _ms(s: float, unit: bool = True) -> str:
    return f"{1e3 * s:.3g}" + (" ms" if unit else "")


def summarize(samples: list[float]) -> Timing:
    """A Timing from raw per-call seconds."""
    xs = sorted(samples)
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1, q3 = xs[0], xs[-1]
    return Timing(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))


def time_interleaved(fns: Mapping[str, Callable[[], Any]], reps: int = 10, warmup: int = 2,
                     max_seconds: Optional[float] = None) -> dict[str, Timing]:
    """Time each callable ``reps`` times in interleaved rounds after ``warmup`` rounds (fair on a busy machine).

    Interleaving spreads load from other processes over all callables instead of charging it to one.
    ``max_seconds`` stops early (at least 3 rounds) when the rounds take too long.
    """
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        t_start = time.perf_counter()
        for r in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
            if max_seconds is not None and r >= 2 and time.perf_counter() - t_start > max_seconds:
                break
    return {k: summarize(v) for k, v in times.items()}


@dataclass(frozen=True)
class Curve:
    """Predicted and measured attention seconds of one variant at one site's shape, by sequence length."""

    label: str
    variant: str
    params: dict
    lengths: tuple[int, ...]
    predicted: tuple[Optional[float], ...]
    measured: tuple[Optional[float], ...]
    crossover: Optional[int]  # shortest length from which the cost model prefers it over dense
    note: str = ""


def _used(plan) -> list:
    """One decision per distinct (variant, params) that the plan runs, dense included."""
    seen, out = set(), []
    for d in plan.decisions:
        if d.variant == "original":
            continue
        key = (d.variant, tuple(sorted((k, repr(v)) for k, v in d.params.items())))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _lengths(high: int, count: int = 4) -> tuple[int, ...]:
    top = max(64, int(high))
    out = sorted({max(64, top >> i) for i in range(count)})
    return tuple(out)


def _operands(s, variant: str, params: dict, n: int):
    """Random q, k, v (and the fitted tensors the kernel takes) at the site's shape and length ``n``."""
    g = torch.Generator().manual_seed(n)
    heads, dk, dv, extra = s.num_kv_heads, s.head_dim, s.v_head_dim, []
    hook = VARIANTS[variant].standalone if variant in VARIANTS else None
    if hook is not None:  # K/V as the kernel reads them after the variant's surgery (fewer heads, a rank)
        heads, dk, dv, extra = hook(s, params, g)
    q = torch.randn(1, s.num_heads, n, s.head_dim, generator=g)
    k = torch.randn(1, heads, n, dk, generator=g)
    v = torch.randn(1, heads, n, dv, generator=g)
    return q, k, v, extra


def attention_curves(plan, max_seconds: float = 25.0, reps: int = 3) -> list[Curve]:
    """Measure (``codegen.run`` on random tensors at the site's shape) and predict each used variant by length.

    Lengths are powers of two up to the site's own length; measuring stops when ``max_seconds`` is spent.
    """
    import codegen
    from passes import pricing
    from passes.dynamic import crossover

    hw = pricing.profile(plan.target)
    deadline = time.perf_counter() + max_seconds
    decisions = _used(plan)
    base = exact_name()
    if decisions and not any(d.variant == base for d in decisions):
        first = decisions[0]
        decisions = [type(first)(first.site, base, {}), *decisions]
    curves = []
    for d in decisions:
        s = dataclasses.replace(d.site, batch=1)  # measured on batch 1 below: predict the same
        high = max(int(s.q_len or 0), int(s.kv_len or 0))
        if high <= 0:
            continue
        lengths = _lengths(high)
        pred, meas, note = [], [], ""
        params = {k: v for k, v in d.params.items()}
        for n in lengths:
            pred.append(pricing.seconds(s, d.variant, params, hw, length=n))
            if time.perf_counter() > deadline:
                meas.append(None)
                note = note or "measurement time bound reached"
                continue
            q, k, v, extra = _operands(s, d.variant, params, n)
            try:
                t = time_interleaved({"k": lambda: codegen.run(d.variant, q, k, v, None, None, s.causal, extra=extra,
                                                               **params)}, reps=reps, warmup=1)["k"]
                meas.append(t.median)
            except Exception as e:  # variants fed by fitted tensors (latent, learned maps) need the model's
                meas.append(None)
                note = f"not measured standalone: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        label = d.variant + (f"({','.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")
        cross = None if d.variant == base else crossover(s, d.variant, params, hw, high)
        curves.append(Curve(label, d.variant, params, lengths, tuple(pred), tuple(meas), cross, note))
    return curves


def plot(curves: list[Curve], path: Path, title: str = "") -> Optional[str]:
    """Write the curves as a PNG (log-log, predicted dashed, measured solid); returns why not, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'attention-rewriter[report]')"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(curves):
        color = "black" if c.variant == exact_name() else f"C{i}"
        xs = [n for n, p in zip(c.lengths, c.predicted) if p is not None]
        ax.plot(xs, [1e3 * p for p in c.predicted if p is not None], "--", color=color, label=f"{c.label} predicted")
        xm = [n for n, m in zip(c.lengths, c.measured) if m is not None]
        if xm:
            ax.plot(xm, [1e3 * m for m in c.measured if m is not None], "o-", color=color,
                    label=f"{c.label} measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for i, c in enumerate(curves):  # after the curves, so the labels sit inside the final limits
        if c.crossover is not None:
            ax.axvline(c.crossover, color=f"C{i}", linestyle=":", linewidth=1)
            ax.annotate(f"{c.variant} crossover {c.crossover}", (c.crossover, ax.get_ylim()[0]), rotation=90,
                        fontsize=7, color=f"C{i}", va="bottom", ha="right")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("attention time per call (ms)")
    ax.set_title(title or "attention time by sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{1e3 * x:.3g}"


def render(plan, measured: Optional[Mapping[str, Any]], curves: list[Curve], plot_note: Optional[str],
           title: str = "Optimization report") -> str:
    """The report as Markdown text."""
    lines = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} on target `{plan.target}`"
             + ("" if plan.calibrated is not False else " (predictions from generic, uncalibrated CPU figures)") + ".",
             "", "## Plan", "", "```text", str(plan), "```", ""]
    lines += ["## Measured", ""]
    if measured:
        for k, v in measured.items():
            lines.append(f"- {k}: {v}")
    else:
        lines.append("- no end-to-end measurement was passed to the report")
    lines += ["", "## Attention time by sequence length", "",
              "One site's shape per variant used; random inputs, batch 1; measured with `codegen.run` "
              "(median of interleaved repetitions after a warm-up), predicted by the cost model.", ""]
    if plot_note:
        lines.append(f"Plot not written: {plot_note}.")
    elif curves:
        lines.append(f"![attention time by sequence length]({PLOT})")
    lines += ["", "| variant | length | predicted ms | measured ms |", "|---|---|---|---|"]
    for c in curves:
        for n, p, m in zip(c.lengths, c.predicted, c.measured):
            lines.append(f"| {c.label} | {n} | {_fmt(p)} | {_fmt(m)} |")
    lines.append("")
    for c in curves:
        if c.variant != exact_name():
            where = (f"from length {c.crossover}" if c.crossover is not None else "at no length up to the site's")
            lines.append(f"- {c.label}: the cost model prefers it over dense {where}.")
        if c.note:
            lines.append(f"- {c.label}: {c.note}.")
    return "\n".join(lines) + "\n"


def write_report(opt, directory: str | Path, measured: Optional[Mapping[str, Any]] = None,
                 max_seconds: float = 25.0, title: str = "Optimization report") -> Path:
    """Write ``report.md`` (plan, measured figures, attention time by length) and its PNG plot into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plan = opt.plan if hasattr(opt, "plan") else opt
    t0 = time.perf_counter()
    curves = attention_curves(plan, max_seconds=max_seconds)
    logger.info("measured attention curves in %.1fs", time.perf_counter() - t0)
    note = plot(curves, out / PLOT) if curves else None
    path = out / "report.md"
    path.write_text(render(plan, measured, curves, note, title))
    return path


__all__ = ["Curve", "Timing", "attention_curves", "plot", "render", "summarize", "time_interleaved", "write_report"]
