"""One program for every sequence length: capture with a dynamic length and dispatch variants by length.

The plan is made on a static capture (static masks are evaluated and classified exactly there).
The model is then captured again with its sequence dimension dynamic (``torch.export.Dim``) over
a declared range; when that capture shows the same sites, each planned site becomes an
``adaptive`` op that runs dense below the length where the cost model says its variant starts to
pay, and the variant from there on. Models that cannot be captured with a dynamic length keep
the per-shape re-capture.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from passes import pricing
from passes.find import Match, find_matches
from passes.plan import Plan
from passes.planner import drops_band
from passes.surgery import rewrite_planned
from rewriter.capture import CallSpec, graph_context

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LengthRange:
    """Which inputs carry the sequence dimension (dim 1) and the lengths the program accepts."""

    names: tuple[str, ...]
    low: int
    high: int

    def accepts(self, kw: dict, captured: dict) -> bool:
        """True when ``kw`` differs from the captured example only in its sequence length, within range."""
        if set(kw) != set(captured):
            return False
        n = None
        for name, t in kw.items():
            ref = captured[name]
            if not isinstance(t, torch.Tensor) or not isinstance(ref, torch.Tensor):
                if repr(t) != repr(ref):
                    return False
                continue
            if t.dtype != ref.dtype or t.dim() != ref.dim():
                return False
            for d, (a, b) in enumerate(zip(t.shape, ref.shape)):
                if name in self.names and d == 1:
                    n = a if n is None else n
                    if a != n or not self.low <= a <= self.high:
                        return False
                elif a != b:
                    return False
        return n is not None

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {"names": list(self.names), "low": self.low, "high": self.high}


def seq_inputs(kw: dict, lengths: Optional[set[int]] = None) -> tuple[str, ...]:
    """Inputs whose dim 1 is the sequence: every tensor of rank >= 2 sharing the first such tensor's dim 1.

    With ``lengths`` (the sites' query/key lengths), dim 1 must be one of them: an input laid out another
    way ([B, H, N, D], say) has no sequence dimension here, and the model is re-captured per shape instead.
    """
    tensors = [(k, t) for k, t in kw.items() if isinstance(t, torch.Tensor) and t.dim() >= 2]
    if not tensors:
        return ()
    n = tensors[0][1].shape[1]
    if lengths is not None and n not in lengths:
        return ()
    return tuple(k for k, t in tensors if t.shape[1] == n)


def capture_dynamic(model: torch.nn.Module, kw: dict, high: int, low: int = 2,
                    lengths: Optional[set[int]] = None):
    """Export ``model`` on keyword inputs ``kw`` with a dynamic sequence length in [low, high], or None."""
    names = seq_inputs(kw, lengths)
    if not names or high < low:
        return None
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), kw, dynamic_shapes=_dynamic_shapes(kw, names, low, high), strict=False)
    except Exception as e:  # specialised lengths, data-dependent control flow: keep per-shape capture
        logger.info("no dynamic-length capture (%s: %s); the model is re-captured per input shape",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return ep, LengthRange(names, low, high)


def _dynamic_shapes(kw: dict, names: tuple[str, ...], low: int, high: int) -> dict:
    seq = torch.export.Dim("seq", min=low, max=high)
    return {k: ({1: seq} if k in names else None) for k in kw}


def _same_sites(a: list[Match], b: list[Match]) -> bool:
    keys = ("causal", "is_cross", "num_heads", "num_kv_heads", "head_dim", "v_head_dim", "rewritable")
    return len(a) == len(b) and all(
        all(getattr(x.site, f) == getattr(y.site, f) for f in keys) for x, y in zip(a, b))


def crossover(site, variant: str, params: dict, hw, high: int) -> Optional[int]:
    """Smallest length (a power of two, or ``high``) from which ``variant`` is predicted faster than dense."""
    lengths = []
    n = 16
    while n < high:
        lengths.append(n)
        n *= 2
    lengths.append(high)
    for n in lengths:
        t_v, t_d = pricing.seconds(site, variant, params, hw, length=n), pricing.seconds(site, "dense", {}, hw, length=n)
        if t_v is not None and t_d is not None and t_v < t_d:
            return n
    return None


def length_adaptive(model: torch.nn.Module, kw: dict, static_matches: list[Match], plan: Plan, hw,
                    high: int) -> Optional[tuple[Any, LengthRange, dict]]:
    """A dynamic-length program rewritten by ``plan`` with per-length dispatch, or None when not possible.

    Returns (exported program, its length range, {site index: schedule}).
    """
    got = capture_dynamic(model, kw, high, lengths={x for m in static_matches for x in (m.site.q_len, m.site.kv_len)})
    if got is None:
        return None
    ep, rng = got
    ctx = graph_context(ep)
    ctx.dynamic = True
    matches, _ = find_matches(ctx)
    if not _same_sites(static_matches, matches):
        logger.info("the dynamic-length capture shows different sites; the model is re-captured per input shape")
        return None
    chosen, schedules = {}, {}
    for m, d in zip(matches, plan.decisions):
        if d.variant == "original":
            continue
        chosen[m.site.index] = (d.variant, dict(d.params))
        # exact at every length (a native window) or reading factored K/V (latent): no dense branch
        if d.variant in ("dense", "latent", "gqa_merge") or drops_band(d.site, d.variant, d.params):
            continue
        start = crossover(d.site, d.variant, d.params, hw, high)
        schedule = [[0, "dense", {}]] if start is None or start > 0 else []
        schedule.append([start if start is not None else high, d.variant, dict(d.params)])
        schedules[m.site.index] = schedule
    failures = rewrite_planned(ep, matches, chosen, adaptive=schedules)
    if failures:
        logger.info("the dynamic-length capture could not be rewritten (%s); re-capturing per shape", failures)
        return None
    # The surgery's shape bookkeeping can pin the symbolic length in node metadata; tracing the
    # rewritten program once more gives clean metadata, so a saved artifact keeps the whole range.
    try:
        with torch.no_grad():
            ep = torch.export.export(ep.module(), (), kw, dynamic_shapes=_dynamic_shapes(kw, rng.names, rng.low, rng.high),
                                     strict=False)
    except Exception as e:
        logger.info("the rewritten program does not re-export with a dynamic length (%s); re-capturing per shape", e)
        return None
    return ep, rng, schedules
