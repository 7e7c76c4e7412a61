"""One call from a captured program to a planned, rewritten one: calibrate, price, choose, rewrite.

Every rewritable site is first rewritten to the exact ``dense`` op; that program is run once on the
calibration samples to record each site's q, k, v, mask and output. The planner then prices and
scores candidates from those records, and a candidate assignment is tried by editing the op
nodes' variant and parameters in place: no re-capture per candidate. Batch rows of the samples are
split into calibration rows (used to fit and choose) and held-out rows (only measured).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from passes import graph as G
from passes import metrics, pricing
from passes.calibrate import SiteRecord, record_sites
from passes.find import Match
from passes.grid import token_grid
from passes.plan import Decision, Plan
from passes.planner import Outcome, SitePlan, choose, search, site_candidates
from passes.rewrite import rewrite_graph
from passes.surgery import Projection, find_projection
from passes.variants import VARIANTS, exact_name

logger = logging.getLogger(__name__)

OP = "rewriter.attention"


def op_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The ``rewriter::attention`` calls of a graph, in graph (= execution) order."""
    return [n for n in graph.nodes if n.op == "call_function" and OP in str(n.target)]


def assign(node: fx.Node, variant: str, params: dict) -> None:
    """Point one op call at another variant (args 6 and 7 of the op are the variant and its JSON params)."""
    args = list(node.args)
    args[6], args[7] = variant, json.dumps(params, sort_keys=True)
    node.args = tuple(args)


@dataclass(frozen=True)
class Rows:
    """Which batch rows of each sample are for calibration and which are held out."""

    calib: tuple[tuple[int, ...], ...]
    held: tuple[tuple[int, ...], ...]


def split_rows(batches: Sequence[int], holdout: float = 0.25) -> Rows:
    """Hold back the last ``holdout`` share of all batch rows (at least one when there are two or more)."""
    units = [(s, r) for s, b in enumerate(batches) for r in range(b)]
    n_held = 0 if len(units) < 2 else max(1, int(round(holdout * len(units))))
    held = set(units[len(units) - n_held:])
    calib = tuple(tuple(r for r in range(b) if (s, r) not in held) for s, b in enumerate(batches))
    hold = tuple(tuple(r for r in range(b) if (s, r) in held) for s, b in enumerate(batches))
    return Rows(calib, hold)


def _batch_of(kw: dict) -> int:
    for t in kw.values():
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


def _restrict(rec: SiteRecord, rows: tuple[int, ...], batch: int) -> Optional[SiteRecord]:
    """The record's calibration rows (when the op's batch is the sample's batch), else the whole record."""
    if rec.q.shape[0] != batch or len(rows) == batch:
        return rec
    if not rows:
        return None
    idx = torch.as_tensor(rows, dtype=torch.long)

    def pick(t):
        return t if t is None or t.dim() == 0 or t.shape[0] != batch else t.index_select(0, idx)

    return SiteRecord(pick(rec.q), pick(rec.k), pick(rec.v), pick(rec.mask), pick(rec.out), rec.scale,
                      rec.causal, rec.softcap, rec.fill, pick(rec.rows))


class Measure:
    """Runs a program on the samples and measures the metric against reference outputs, per row split."""

    def __init__(self, references: list, samples: list[dict], rows: Rows, metric: metrics.MetricChoice):
        self.references, self.samples, self.rows, self.metric = references, samples, rows, metric

    def __call__(self, module: Callable[..., Any]) -> tuple[float, Optional[float]]:
        """(error on calibration rows, error on held-out rows or None)."""
        acc = {"calib": [0.0, 0.0], "held": [0.0, 0.0]}
        with torch.no_grad():
            for kw, ref, rc, rh in zip(self.samples, self.references, self.rows.calib, self.rows.held):
                out = module(**kw)
                b = _batch_of(kw)
                pad = metrics.padding_rows(kw)
                for key, rows in (("calib", rc), ("held", rh)):
                    if not rows:
                        continue
                    sel = lambda x: metrics.select_rows(x, rows, b)  # noqa: E731
                    n, d = metrics.sums(sel(ref), sel(out), self.metric,
                                        None if pad is None else pad[list(rows)], inputs=sel(kw))
                    acc[key][0] += n
                    acc[key][1] += d
        calib = metrics.finish(*acc["calib"], self.metric)
        held = metrics.finish(*acc["held"], self.metric) if any(self.rows.held) else None
        return calib, held


def plan_program(
    ep: torch.export.ExportedProgram,
    matches: list[Match],
    samples: list[dict],
    reference: Callable[..., Any],
    budget: Optional[float],
    allowed: dict[str, Optional[dict]],
    target: str,
    metric: metrics.Metric = None,
    progress: Optional[Callable[[str], None]] = None,
    site_cap: Optional[float] = None,
) -> "Planned":
    """Rewrite ``ep`` in place to the planned variants; returns the plan and any weight surgery it needs.

    Sites planned as ``latent`` run a planning-only probe in ``ep``: the caller applies the surgery
    to a copy of the model and captures that (see ``rewriter.api``). ``metric`` None is chosen from what
    the model returns (``metrics.resolve``); ``site_cap`` bounds every approximate site's own error.
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    hw = pricing.profile(target, torch.cuda.get_device_name() if target == "cuda" and torch.cuda.is_available() else "")
    pending = [(m, *choose(m, {exact_name(): None})) for m in matches]
    failures = rewrite_graph(ep.graph_module, [(m, v, p) for m, v, p, _ in pending if v is not None])
    live = [m for m, v, _, _ in pending if v is not None and m.site.index not in failures]
    nodes = op_nodes(ep.graph_module.graph)
    if len(nodes) != len(live):
        raise RuntimeError(f"{len(nodes)} attention ops in the rewritten graph for {len(live)} rewritten sites")
    say(f"{len(live)} of {len(matches)} site(s) rewritten to exact dense; calibrating on {len(samples)} sample(s)")
    with torch.no_grad():
        references = [reference(**kw) for kw in samples]
    choice = metrics.resolve(metric, samples[0], references[0], causal=any(m.site.causal for m in live))
    say(f"budget measured as {choice.describe()}")
    records = record_sites(ep, samples, nodes)
    batches = [_batch_of(kw) for kw in samples]
    rows = split_rows(batches)
    calib_records: list[list[SiteRecord]] = []
    for per in records:
        kept = [_restrict(r, rows.calib[s], batches[s]) for s, r in enumerate(per)]
        calib_records.append([r for r in kept if r is not None])
    measure = Measure(references, samples, rows, choice)

    projections: list[Optional[tuple[Projection, Projection]]] = []
    need_kv = [n for n in allowed if "factored_kv" in VARIANTS[n].needs]
    need_grid = [n for n in allowed if "grid" in VARIANTS[n].needs]
    dg = G.to_digraph(ep.graph_module.graph) if need_grid else None
    plans: list[SitePlan] = []
    for i, m in enumerate(live):
        blocked = {}
        if need_kv and len(m.batch) != 2:
            projections.append(None)
            why = "the attention runs in a flattened [B*H] layout; the surgery needs separate batch and head dims"
            blocked.update(dict.fromkeys(need_kv, why))
        elif need_kv:
            pk, why_k = find_projection(ep, nodes[i].args[1])
            pv, why_v = find_projection(ep, nodes[i].args[2])
            projections.append((pk, pv) if pk and pv else None)
            if not (pk and pv):
                why = f"its {'keys' if pk is None else 'values'}: {why_k or why_v}"
                blocked.update(dict.fromkeys(need_kv, why))
        else:
            projections.append(None)
        facts = {}
        if need_grid:
            grid = token_grid(dg, nodes[i].args[0], m.site.q_len) if m.site.q_len > 0 else None
            facts["grid"] = grid
            if grid is None:
                blocked.update(dict.fromkeys(
                    need_grid, "its tokens do not come from one patch embedding (no image grid found)"))
        sp = site_candidates(m.site, allowed, hw, forced=budget is None, blocked=blocked, facts=facts)
        for name, rec in VARIANTS.items():  # fitting on the records: factors, merged heads, feature maps
            cands = [c for c in sp.options if c.variant == name]
            if cands and rec.prepare is not None:
                rec.prepare(sp, cands, calib_records[i], i, say)
        plans.append(sp)

    def evaluate(assignment: dict[int, tuple[str, dict]], by: Measure = measure) -> tuple[float, Optional[float]]:
        for i, (variant, params) in assignment.items():
            assign(nodes[i], variant, params)
        ep.graph_module.recompile()
        return by(ep.module())

    gain_evaluate = None
    if choice.name == "perplexity":
        # One site's perplexity change on a few rows is noisy and can be negative (a gain of 0 would let any
        # candidate through); next-token KL is smooth, never negative, and for a model that fits its text
        # about the log-perplexity change, so it measures the gains and the back-off measures perplexity.
        kl = Measure(references, samples, rows, metrics.MetricChoice("kl", leaf=choice.leaf))
        gain_evaluate = lambda a: evaluate(a, kl)  # noqa: E731
    # KL and cosine (and perplexity, probed by KL) grow with the square of a small error, L2 linearly
    power = 1.0 if choice.name in ("l2", "custom") else 2.0
    outcome: Outcome = search(plans, calib_records, evaluate, budget, progress=say, site_cap=site_cap,
                              gain_evaluate=gain_evaluate, power=power)
    surgeries, fitted, merges = [], [], []
    for i, sp in enumerate(outcome.sites):
        assign(nodes[i], *(sp.chosen.probe or (sp.chosen.variant, sp.chosen.params)))
        kind = VARIANTS[sp.chosen.variant].weight_surgery
        if kind == "low_rank":
            pk, pv = projections[i]
            surgeries.append(Surgery(live[i].site.index, pk, sp.chosen.extra[0], pv, sp.chosen.extra[1]))
        elif kind == "merge_heads":
            pk, pv = projections[i]
            merges.append((live[i].site.index, pk, pv, int(sp.chosen.params["groups"])))
        elif sp.chosen.extra:
            fitted.append((live[i].site.index, tuple(sp.chosen.extra)))
    ep.graph_module.recompile()
    _forget_probes(plans)
    return Planned(_plan(matches, live, outcome, pending, failures, hw, target, budget, choice, rows, site_cap),
                   tuple(surgeries),
                   tuple(fitted), tuple(merges))


def plan_unmeasured(ep: torch.export.ExportedProgram, matches: list[Match], allowed: dict[str, Optional[dict]],
                    target: str, budget: Optional[float], why: str, notes: tuple[str, ...] = ()) -> Plan:
    """Rewrite ``ep`` with no calibration run (a model on the meta device): priced, never measured.

    Exact rewrites only, unless the caller pinned variants; every site is priced for the target, and
    a pinned approximate variant says that its error was not measured.
    """
    hw = pricing.profile(target)
    rest = {k: v for k, v in allowed.items() if k == exact_name()} or allowed
    chosen = {}
    for m in matches:
        variant, params, _ = choose(m, rest)
        if variant is not None:
            chosen[m.site.index] = (variant, params)
    failures = rewrite_graph(ep.graph_module, [(m, *chosen[m.site.index]) for m in matches if m.site.index in chosen])
    decisions = []
    for m in matches:
        idx = m.site.index
        if idx not in chosen or idx in failures:
            decisions.append(Decision(m.site, "original", {}, None, None, failures.get(idx, m.site.reason)))
            continue
        variant, params = chosen[idx]
        exact = bool(VARIANTS[variant].exact(m.site, params))
        reason = f"{'exact;' if exact else 'approximate; error'} not measured ({why})"
        decisions.append(Decision(m.site, variant, params, pricing.predicted_speedup(m.site, variant, params, hw),
                                  0.0 if exact else None, reason))
    return Plan(tuple(decisions), target=target, budget=budget, notes=notes)


@dataclass(frozen=True)
class Surgery:
    """Latent weight surgery one site needs: its K and V projections and the per-head bases."""

    site: int
    k_proj: Projection
    uk: torch.Tensor
    v_proj: Projection
    uv: torch.Tensor


@dataclass(frozen=True)
class Planned:
    """The plan, and the weight surgery it needs before the final rewrite (empty when none)."""

    plan: Plan
    surgeries: tuple[Surgery, ...] = ()
    fitted: tuple[tuple[int, tuple[torch.Tensor, ...]], ...] = ()  # (site, tensors the op takes as extra)
    merges: tuple[tuple[int, Projection, Projection, int], ...] = ()  # (site, K proj, V proj, merged heads)


def _forget_probes(plans: list[SitePlan]) -> None:
    """Drop the planning-only tensors the probe kernels looked up: a chosen probe always makes the caller
    apply the surgery and capture again, so nothing that outlives planning reads them."""
    from codegen import lowrank

    for sp in plans:
        for c in sp.options:
            if c.probe is not None:
                lowrank.PROBES.pop(c.probe[1].get("probe", ""), None)


def _plan(matches, live, outcome: Outcome, pending, failures, hw, target, budget, choice: metrics.MetricChoice, rows,
          site_cap: Optional[float]) -> Plan:
    by_site = {m.site.index: sp for m, sp in zip(live, outcome.sites)}
    decisions = []
    for m, variant, _, reason in pending:
        idx = m.site.index
        if variant is None or idx in failures:
            decisions.append(Decision(m.site, "original", {}, None, None, failures.get(idx, reason)))
            continue
        sp = by_site[idx]
        c = sp.chosen
        speedup = pricing.predicted_speedup(m.site, c.variant, c.params, hw)
        exact_base = VARIANTS[c.variant].kernel.exact_always
        why = sp.note or ("exact; fused kernel" if exact_base else "")
        if exact_base and not sp.options and sp.refusals:
            why = (f"{why}; not applicable: {'; '.join(sp.refusals)}" if why
                   else "not applicable: " + "; ".join(sp.refusals))
        note = "; ".join(x for x in (why, *m.site.notes) if x)
        decisions.append(Decision(m.site, c.variant, dict(c.params), speedup, c.error, note))
    notes = []
    if budget is not None and outcome.error is not None and outcome.error > budget:
        notes.append(f"every remaining rewrite is exact; the measured {outcome.error:.1e} is float rounding, "
                     "which is not charged to the budget")
    if not any(rows.held):
        notes.append("no held-out rows: pass more calibration samples (or a batch of 2+) to measure held-out error")
    if outcome.backoffs:
        notes.append(f"{outcome.backoffs} back-off step(s) to fit the budget")
    return Plan(tuple(decisions), target=target, budget=budget, error=outcome.error,
                holdout_error=outcome.holdout_error, metric=choice.name, metric_reason=choice.reason,
                site_cap=None if budget is None else site_cap, notes=tuple(notes))
