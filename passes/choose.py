"""Calibrate, then price and choose: the two passes that make the plan from measurements.

Every rewritable site is first rewritten to the exact baseline op; that program is run once on the
calibration samples to record each site's q, k, v, mask and output. The planner then prices and
scores candidates from those records, and a candidate assignment is tried by editing the op nodes'
variant and parameters in place: no re-capture per candidate. Batch rows of the samples are split
into calibration rows (used to fit and choose) and held-out rows (only measured).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from passes import graph as G
from passes import metrics, pricing
from passes.calibrate import SiteRecord, record_sites
from passes.contract import PassResult, ProgramPass
from passes.find import Match
from passes.grid import token_grid
from passes.measure import Measure, Rows, assign, batch_of, op_nodes, restrict, split_rows
from passes.plan import Decision
from passes.planner import Outcome, SitePlan, choose, search, site_candidates
from passes.rewrite import rewrite_graph
from passes.rotary import Rotary, find_rotary
from passes.state import Measured, Program, Surgery, Weights
from passes.surgery import find_projection
from passes.variants import VARIANTS, exact_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Planning:
    """What calibration hands the search: the exact program's op nodes, the records, the measure."""

    hw: Any
    pending: tuple  # (match, baseline variant or None, params, reason) per site found
    failures: dict  # site index -> why its exact rewrite failed
    live: tuple[Match, ...]  # the sites that now run the op, in op-node order
    nodes: tuple[fx.Node, ...]
    records: tuple[tuple[SiteRecord, ...], ...]  # per live site, its calibration rows' records
    rows: Rows
    choice: metrics.MetricChoice
    measure: Measure
    references: tuple
    rotary: tuple = ()  # per live site: its keys' rotary embedding (Rotary), "why not supported", or None


def hardware(target: str):
    """The profile the plan is priced on (the attached GPU's when the target is CUDA)."""
    return pricing.profile(target, torch.cuda.get_device_name() if target == "cuda" and torch.cuda.is_available()
                           else "")


class Calibrate(ProgramPass[Program]):
    """Rewrite every site to the exact op, run the samples once, and record each site's operands and output."""

    name = "calibrate"

    def __init__(self, references: Optional[tuple] = None):
        # the program's outputs on its samples when the caller already ran them (a pipeline stage): not run twice
        self.references = references

    def call(self, p: Program) -> PassResult[Program]:
        say, ep, matches = p.options.say, p.ep, p.matches
        reference = ep.module()  # the capture before any rewrite: eager's own fast paths are not charged to us
        pending = tuple((m, *choose(m, {exact_name(): None})) for m in matches)
        failures = rewrite_graph(ep.graph_module, [(m, v, prm) for m, v, prm, _ in pending if v is not None])
        live = tuple(m for m, v, _, _ in pending if v is not None and m.site.index not in failures)
        nodes = tuple(op_nodes(ep.graph_module.graph))
        if len(nodes) != len(live):
            raise RuntimeError(f"{len(nodes)} attention ops in the rewritten graph for {len(live)} rewritten sites")
        say(f"{len(live)} of {len(matches)} site(s) rewritten to exact dense; calibrating on {len(p.samples)} "
            "sample(s)")
        with torch.no_grad():
            references = self.references or tuple(reference(**kw) for kw in p.samples)
            gap = metrics.relative_l2(p.spec.call(p.model, p.samples[0]), references[0])
        notes = () if gap <= 1e-4 else (
            f"note: the captured graph differs from eager by {gap:.1e} (relative L2) before any rewrite; eager took "
            "a path export does not trace (e.g. nested-tensor padding)",)
        choice = metrics.resolve(p.options.metric, p.samples[0], references[0],
                                 causal=any(m.site.causal for m in live))
        say(f"budget measured as {choice.describe()}")
        rotary = _attach_rotary(p, nodes)
        records = record_sites(ep, list(p.samples), list(nodes))
        batches = [batch_of(kw) for kw in p.samples]
        rows = split_rows(batches)
        kept = tuple(tuple(r for r in (restrict(rec, rows.calib[s], batches[s]) for s, rec in enumerate(per))
                           if r is not None) for per in records)
        planning = Planning(hardware(p.options.target), pending, failures, live, nodes, kept, rows, choice,
                            Measure(list(references), list(p.samples), rows, choice), references, rotary)
        return PassResult(p.noted(*notes, planning=planning), True, f"{len(live)} site(s) recorded")


class Choose(ProgramPass[Program]):
    """Price every candidate, fit what needs fitting, search within the budget and set each op to its choice."""

    name = "price and choose"

    def call(self, p: Program) -> PassResult[Program]:
        pl: Planning = p.planning
        plans, projections = self._candidates(p, pl)
        return self.finish(p, pl, plans, projections, self.search(p, pl, plans))

    def search(self, p: Program, pl: Planning, plans: list[SitePlan]) -> Outcome:
        """The planner's search over ``plans``, measuring candidate assignments on this process's program."""
        opts, ep = p.options, p.ep

        def evaluate(assignment: dict[int, tuple[str, dict]],
                     by: Measure = pl.measure) -> tuple[float, Optional[float]]:
            return by(apply_assignment(ep, pl.nodes, assignment))

        gain_evaluate = None
        if pl.choice.name == "perplexity":
            # One site's perplexity change on a few rows is noisy and can be negative (a gain of 0 would let any
            # candidate through); next-token KL is smooth, never negative, and for a model that fits its text
            # about the log-perplexity change, so it measures the gains and the back-off measures perplexity.
            kl = Measure(list(pl.references), list(p.samples), pl.rows, gain_metric(pl.choice))
            gain_evaluate = lambda a: evaluate(a, kl)  # noqa: E731
        return search(plans, list(pl.records), evaluate, opts.budget, progress=opts.say, site_cap=opts.site_cap,
                      gain_evaluate=gain_evaluate, power=metric_power(pl.choice))

    def finish(self, p: Program, pl: Planning, plans: list[SitePlan], projections: list,
               outcome: Outcome) -> PassResult[Program]:
        """Point each op at the search's choice and turn the outcome into decisions, notes and weight changes."""
        opts, ep = p.options, p.ep
        weights = _weights(outcome, pl, projections)
        ep.graph_module.recompile()
        _forget_probes(plans)
        decisions, notes = _decisions(p, pl, outcome)
        calibrated = None
        if opts.target == "cpu":  # say so when the times behind the plan were not measured on this machine
            hw = pricing.profile("cpu")
            note = pricing.profile_note(hw)
            notes += (note,) if note else ()
            calibrated = not hw.source.startswith("generic")
        measured = Measured(outcome.error, outcome.holdout_error, pl.choice.name, pl.choice.reason,
                            None if opts.budget is None else opts.site_cap, calibrated)
        chosen = sum(d.variant not in ("original", exact_name()) for d in decisions)
        return PassResult(p.noted(*notes, decisions=decisions, measured=measured, weights=weights), True,
                          f"{chosen} site(s) take an approximate or specialised variant")

    @staticmethod
    def _candidates(p: Program, pl: Planning) -> tuple[list[SitePlan], list]:
        """Every live site's priced candidates, after the variants' fitting hooks ran on its records."""
        allowed, ep = p.options.allowed, p.ep
        need_kv = [n for n in allowed if "factored_kv" in VARIANTS[n].needs]
        need_grid = [n for n in allowed if "grid" in VARIANTS[n].needs]
        dg = G.to_digraph(ep.graph_module.graph) if need_grid else None
        plans, projections = [], []
        for i, m in enumerate(pl.live):
            blocked: dict[str, str] = {}
            pair = None
            if need_kv and len(m.batch) != 2:
                why = "the attention runs in a flattened [B*H] layout; the surgery needs separate batch and head dims"
                blocked.update(dict.fromkeys(need_kv, why))
            elif need_kv:
                rot = pl.rotary[i] if pl.rotary else None
                keys = rot.key if isinstance(rot, Rotary) else pl.nodes[i].args[1]
                pk, why_k = find_projection(ep, keys, p.model)
                pv, why_v = find_projection(ep, pl.nodes[i].args[2], p.model)
                if isinstance(rot, str):
                    pk, why_k = None, rot
                pair = (pk, pv) if pk and pv else None
                if pair is None:
                    why = f"its {'keys' if pk is None else 'values'}: {why_k or why_v}"
                    blocked.update(dict.fromkeys(need_kv, why))
                elif isinstance(rot, Rotary):
                    blocked.update({n: "its keys are rotated after their projection (rotary embeddings), which this "
                                    "variant does not take" for n in need_kv if not VARIANTS[n].rotary_keys})
            projections.append(pair)
            facts = {}
            if isinstance(pl.rotary[i] if pl.rotary else None, Rotary):
                facts["rope"] = pl.rotary[i].form
            if need_grid:
                grid = token_grid(dg, pl.nodes[i].args[0], m.site.q_len) if m.site.q_len > 0 else None
                facts["grid"] = grid
                if grid is None:
                    blocked.update(dict.fromkeys(
                        need_grid, "its tokens do not come from one patch embedding (no image grid found)"))
            sp = site_candidates(m.site, allowed, pl.hw, forced=p.options.budget is None, blocked=blocked,
                                 facts=facts)
            for name, rec in VARIANTS.items():  # fitting on the records: factors, merged heads, feature maps
                cands = [c for c in sp.options if c.variant == name]
                if cands and rec.prepare is not None:
                    rec.prepare(sp, cands, list(pl.records[i]), i, p.options.say)
                    _reprice(sp, [c for c in cands if c in sp.options], pl.hw, forced=p.options.budget is None)
            plans.append(sp)
        return plans, projections


def apply_assignment(ep: torch.export.ExportedProgram, nodes: tuple[fx.Node, ...],
                     assignment: dict[int, tuple[str, dict]]) -> torch.nn.Module:
    """Set the op nodes to ``assignment`` (node position -> variant, params) and return the program to run."""
    for i, (variant, params) in assignment.items():
        assign(nodes[i], variant, params)
    ep.graph_module.recompile()
    return ep.module()


def gain_metric(choice: metrics.MetricChoice) -> metrics.MetricChoice:
    """The metric gain probes are measured by under a perplexity budget: next-token KL on the same logits."""
    return metrics.MetricChoice("kl", leaf=choice.leaf)


def metric_power(choice: metrics.MetricChoice) -> float:
    """How the metric grows with a small error: KL and cosine (and perplexity, probed by KL) with its square,
    L2 linearly."""
    return 1.0 if choice.name in ("l2", "custom") else 2.0


def _reprice(sp: SitePlan, cands: list, hw, forced: bool) -> None:
    """Price again the choices whose parameters a fitting hook settled (a measured cap), and drop those that are
    no longer cheaper than the exact kernel (unless the caller forced them)."""
    for c in cands:
        t = pricing.seconds(sp.site, c.variant, c.params, hw)
        if t is None or not (forced or t < sp.dense.seconds):
            sp.options.remove(c)
            continue
        c.seconds = t
    sp.options.sort(key=lambda c: c.seconds)


def _attach_rotary(p: Program, nodes: tuple[fx.Node, ...]) -> tuple:
    """Per op node: its keys' rotary embedding (the op then carries the model's cos and sin as extra operands,
    so calibration records them and a planning probe can undo the rotation), why it is not supported, or None.

    Only looked for when an allowed variant takes rotary keys; other variants ignore the extra operands."""
    if not any(VARIANTS[n].rotary_keys for n in p.options.allowed):
        return ()
    found: list = []
    for node in nodes:
        rot, why = find_rotary(node.args[1])
        found.append(rot if rot is not None else (why or None))
        if rot is not None:
            _set_extra(node, [rot.cos, rot.sin])
    p.ep.graph_module.recompile()
    return tuple(found)


def _set_extra(node: fx.Node, extra: list) -> None:
    """Set an op call's extra operands (arg 8 of the op)."""
    args = list(node.args)
    args[8] = extra
    node.args = tuple(args)


def _weights(outcome: Outcome, pl: Planning, projections: list) -> Weights:
    """Point each op at its choice and collect the weight changes the choices need."""
    surgeries, fitted, merges = [], [], []
    for i, sp in enumerate(outcome.sites):
        assign(pl.nodes[i], *(sp.chosen.probe or (sp.chosen.variant, sp.chosen.params)))
        if isinstance(pl.rotary[i] if pl.rotary else None, Rotary) and not VARIANTS[sp.chosen.variant].rotary_keys:
            _set_extra(pl.nodes[i], [])  # the planning graph may be the program: it carries no unused operands
        kind = VARIANTS[sp.chosen.variant].weight_surgery
        if kind == "low_rank":
            pk, pv = projections[i]
            surgeries.append(Surgery(pl.live[i].site.index, pk, sp.chosen.extra[0], pv, sp.chosen.extra[1]))
        elif kind == "merge_heads":
            pk, pv = projections[i]
            merges.append((pl.live[i].site.index, pk, pv, int(sp.chosen.params["groups"])))
        elif sp.chosen.extra:
            fitted.append((pl.live[i].site.index, tuple(sp.chosen.extra)))
    return Weights(tuple(surgeries), tuple(fitted), tuple(merges))


def _forget_probes(plans: list[SitePlan]) -> None:
    """Drop the planning-only tensors the probe kernels looked up: a chosen probe always makes the caller
    apply the surgery and capture again, so nothing that outlives planning reads them."""
    from codegen import lowrank

    for sp in plans:
        for c in sp.options:
            if c.probe is not None:
                lowrank.PROBES.pop(c.probe[1].get("probe", ""), None)


def _decisions(p: Program, pl: Planning, outcome: Outcome) -> tuple[tuple[Decision, ...], tuple[str, ...]]:
    """One decision per site found (the search's choice, or why it stays as it was) and the plan's notes."""
    by_site = {m.site.index: sp for m, sp in zip(pl.live, outcome.sites)}
    decisions = []
    for m, variant, _, reason in pl.pending:
        idx = m.site.index
        if variant is None or idx in pl.failures:
            decisions.append(Decision(m.site, "original", {}, None, None, pl.failures.get(idx, reason)))
            continue
        sp = by_site[idx]
        c = sp.chosen
        speedup = pricing.predicted_speedup(m.site, c.variant, c.params, pl.hw)
        exact_base = VARIANTS[c.variant].kernel.exact_always
        why = sp.note or ("exact; fused kernel" if exact_base else "")
        if exact_base and not sp.options and sp.refusals:
            why = (f"{why}; not applicable: {'; '.join(sp.refusals)}" if why
                   else "not applicable: " + "; ".join(sp.refusals))
        note = "; ".join(x for x in (why, *m.site.notes) if x)
        decisions.append(Decision(m.site, c.variant, dict(c.params), speedup, c.error, note))
    notes = []
    budget = p.options.budget
    if budget is not None and outcome.error is not None and outcome.error > budget:
        notes.append(f"every remaining rewrite is exact; the measured {outcome.error:.1e} is float rounding, "
                     "which is not charged to the budget")
    if not any(pl.rows.held):
        notes.append("no held-out rows: pass more calibration samples (or a batch of 2+) to measure held-out error")
    if outcome.backoffs:
        notes.append(f"{outcome.backoffs} back-off step(s) to fit the budget")
    return tuple(decisions), tuple(notes)
