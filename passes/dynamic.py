"""One program for every sequence length: capture with a dynamic length and dispatch variants by length.

The plan is made on a static capture (static masks are evaluated and classified exactly there).
The model is then captured again with its sequence dimension dynamic (``torch.export.Dim``) over
1..max_len; masks the model builds from its runtime length are computed at several lengths there
and must classify the same. When that capture shows the same sites, exact and forced variants run
at every length; a planned (budgeted) approximate site becomes an ``adaptive`` op that runs dense
below the length where the cost model says its variant starts to pay, the variant from there up to
the length it was calibrated on, and exact dense beyond it. Models that cannot be captured with a
dynamic length keep the per-shape re-capture.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import fx

from passes import graph as G
from passes import masks, pricing
from passes.capture import graph_context
from passes.find import Match, find_matches
from passes.plan import Decision
from passes.planner import drops_band
from passes.surgery import rewrite_planned
from passes.variants import VARIANTS, exact_name

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


# Config fields that state a model's longest sequence (Hugging Face and common hand-written spellings).
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "n_ctx",
                   "seq_length", "block_size", "context")


def position_limit(model: torch.nn.Module, ctx) -> Optional[int]:
    """The longest sequence the model can take, when it says: a position table, or a config field.

    A position table is found from the static capture's dataflow: an embedding of a weight whose
    indices do not depend on the data and count up by one along the sequence (arange of the length,
    or a slice of a position-ids buffer); it holds ``rows - first index`` positions. Config fields are
    read from ``model.config`` (or ``model.cfg``). The smallest of them, or None.
    """
    limits = []
    for n in ctx.graph.nodes:
        if G.opname(n) != "embedding" or len(n.args) < 2:
            continue
        weight, idx = n.args[0], n.args[1]
        if not isinstance(weight, fx.Node) or not isinstance(idx, fx.Node) or idx in ctx.activations:
            continue
        table = ctx.constants.get(weight.name)
        value = masks.evaluate(ctx, idx)
        if table is None or value is None or value.dim() < 1 or value.shape[-1] < 2 or value.is_floating_point():
            continue
        row = value.reshape(-1, value.shape[-1])[0]
        if bool((row[1:] - row[:-1] == 1).all()) and int(row[0]) >= 0:
            limits.append(int(table.shape[0]) - int(row[0]))
    for holder in (getattr(model, "config", None), getattr(model, "cfg", None)):
        for f in POSITION_FIELDS if holder is not None else ():
            v = getattr(holder, f, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                limits.append(v)
                break
    return min(limits) if limits else None


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


def capture_dynamic(model: torch.nn.Module, kw: dict, high: int, low: int = 1,
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
    keys = ("causal", "mask_kind", "is_cross", "num_heads", "num_kv_heads", "head_dim", "v_head_dim", "rewritable",
            "window", "softcap", "has_bias", "fill")
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
        t_v, t_d = (pricing.seconds(site, variant, params, hw, length=n),
                    pricing.seconds(site, exact_name(), {}, hw, length=n))
        if t_v is not None and t_d is not None and t_v < t_d:
            return n
    return None


def schedule(site, variant: str, params: dict, hw, calibrated: int, high: int) -> list:
    """Dense below the crossover, ``variant`` from there to ``calibrated``, exact dense beyond (up to ``high``)."""
    start = crossover(site, variant, params, hw, calibrated)
    start = calibrated if start is None else start
    out = [[0, exact_name(), {}]] if start > 0 else []
    out.append([start, variant, dict(params)])
    if calibrated < high:
        out.append([calibrated + 1, exact_name(), {}])
    return out


def length_adaptive(model: torch.nn.Module, kw: dict, static_matches: list[Match], decisions: Sequence[Decision], hw,
                    high: int, calibrated: Optional[int] = None) -> Optional[tuple[Any, LengthRange, dict]]:
    """A dynamic-length program (lengths 1..``high``) rewritten by ``decisions``, or None when not possible.

    ``calibrated`` is the longest length a planned (budgeted) approximate variant was measured at: such
    a site is scheduled dense below its cost-model crossover, the variant up to ``calibrated`` and exact
    dense beyond it. None means the variants were forced (no accuracy gate): they run at every length.
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
    for m, d in zip(matches, decisions):
        if d.variant == "original":
            continue
        chosen[m.site.index] = (d.variant, dict(d.params))
        # exact at every length (the baseline, a native window), reading rewritten weights, or forced:
        # no dense branch
        rec = VARIANTS[d.variant]
        if (calibrated is None or rec.kernel.exact_always or rec.changes_weights
                or drops_band(d.site, d.variant, d.params)):
            continue
        schedules[m.site.index] = schedule(d.site, d.variant, d.params, hw, calibrated, high)
    failures = rewrite_planned(ep, matches, chosen, adaptive=schedules)
    if failures:
        logger.info("the dynamic-length capture could not be rewritten (%s); re-capturing per shape", failures)
        return None
    # The surgery's shape bookkeeping can pin the symbolic length in node metadata; tracing the
    # rewritten program once more gives clean metadata, so a saved artifact keeps the whole range.
    try:
        with torch.no_grad():
            ep = torch.export.export(ep.module(), (), kw,
                                     dynamic_shapes=_dynamic_shapes(kw, rng.names, rng.low, rng.high),
                                     strict=False)
    except Exception as e:
        logger.info("the rewritten program does not re-export with a dynamic length (%s); re-capturing per shape", e)
        return None
    return ep, rng, schedules


def example_length(kw: dict, matches: list[Match]) -> Optional[int]:
    """The example's sequence length (dim 1 of its sequence inputs), or None when it has none."""
    lengths = {x for m in matches for x in (m.site.q_len, m.site.kv_len)}
    names = seq_inputs(kw, lengths)
    return int(kw[names[0]].shape[1]) if names else None


def every_length(source: torch.nn.Module, kw0: dict, matches: list[Match], decisions: Sequence[Decision], hw,
                 max_len: Optional[int], forced: bool, ctx) -> Optional[tuple[Any, LengthRange, list[str]]]:
    """One program for lengths 1..max_len (the position limit, else 8x the example): (program, range, notes)."""
    n = example_length(kw0, matches)
    if n is None:
        return None
    declared = max_len is not None
    limit = None if declared else position_limit(source, ctx)
    high = max_len if declared else (limit if limit is not None and limit >= n else 8 * n)
    calibrated = None if forced else n
    got = length_adaptive(source, kw0, matches, decisions, hw, high, calibrated)
    if got is None and not declared and high > n:  # the default reached past what the model takes: the example's
        got = length_adaptive(source, kw0, matches, decisions, hw, n, calibrated)
    if got is None:
        return None
    ep_dyn, rng, schedules = got
    why = ("declared max_len" if declared else "the model's position limit" if limit is not None and rng.high == limit
           else "8x the example length" if rng.high == 8 * n else "the example length")
    notes = [f"one program serves sequence lengths {rng.low}..{rng.high} ({why})"]
    for d in decisions:
        sched = schedules.get(d.site.index)
        if not sched:
            if not forced and d.variant in VARIANTS and VARIANTS[d.variant].changes_weights and rng.high > n:
                notes.append(f"site {d.site.index}: {d.variant} changes the weights, so it runs at every length; "
                             f"its error was measured at length {n} only")
            continue
        start = next((e[0] for e in sched if e[1] == d.variant), None)
        if start:
            notes.append(f"site {d.site.index}: dense below length {start}, {d.variant} from there "
                         "(cost model crossover)")
        if sched[-1][1] == exact_name() and sched[-1][0] > 0 and start is not None:
            notes.append(f"site {d.site.index}: {d.variant} serves lengths up to {sched[-1][0] - 1} (the calibrated "
                         f"range); exact dense beyond it")
    return ep_dyn, rng, notes
