"""``optimize`` as a sequence of passes: inputs → capture and find → calibrate → price and choose →
weight surgery → rewrite → one program for every length.

Each pass keeps ``passes.contract``'s contract: it takes the ``Program`` state and returns a
``PassResult`` saying what changed. A model with nothing to run (on the meta device, say) is priced
and finished early. The plan is built once from the final state (``passes.state.plan_of``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch

from passes import metrics, pricing
from passes.capture import analyse, call_spec, graph_context, split_inputs
from passes.choose import Calibrate, Choose, hardware
from passes.contract import PassResult, ProgramPass, run_passes
from passes.dynamic import every_length, example_length
from passes.find import Match
from passes.options import Options, bind_samples, input_signature
from passes.plan import Decision
from passes.planner import choose, drops_band
from passes.rewrite import rewrite_graph
from passes.state import Program
from passes.surgery import apply_latent, apply_merge, attach_fitted, parameter_count, rewrite_planned
from passes.variants import VARIANTS, exact_name

logger = logging.getLogger(__name__)


class BindInputs(ProgramPass[Program]):
    """Bind the example and calibration samples to the model's signature; errors here come before any work."""

    name = "inputs"

    def call(self, p: Program) -> PassResult[Program]:
        args0, kwargs0 = split_inputs(p.example_inputs)
        spec0 = call_spec(p.model, args0, kwargs0)
        on_meta = any(t.device.type == "meta" for t in p.model.parameters())
        signature = input_signature(spec0.bind(args0, kwargs0)) if not spec0.var_positional else None
        samples = None
        if not on_meta and signature is not None:
            samples = bind_samples(p.calibration, p.example_inputs, spec0, signature)
        if p.options.metric == "perplexity" and samples:  # the model must return token logits: say so now
            with torch.no_grad():
                metrics.check_perplexity(samples[0], spec0.call(p.model, samples[0]))
        return PassResult(p.but(signature=signature, samples=samples, on_meta=on_meta), False,
                          f"{len(samples or ())} calibration sample(s)")


class Capture(ProgramPass[Program]):
    """Capture the model with torch.export and find every attention in the graph."""

    name = "capture and find"

    def call(self, p: Program) -> PassResult[Program]:
        p.options.say(f"capturing {type(p.model).__name__} with torch.export")
        ep, spec, matches, _ = analyse(p.model, p.example_inputs)
        p.options.say(f"found {len(matches)} attention site(s)")
        args0, kwargs0 = split_inputs(p.example_inputs)
        example = spec.bind(args0, kwargs0)
        signature, samples = p.signature, p.samples
        if signature is None:  # a model taking *args: its names are known only after capture
            signature = input_signature(example)
            samples = None if p.on_meta else bind_samples(p.calibration, p.example_inputs, spec, signature)
        n = example_length(example, matches)
        if p.options.max_len is not None and n is not None and p.options.max_len < n:
            raise ValueError(f"max_len={p.options.max_len} is shorter than the example inputs' sequence length {n}; "
                             "pass max_len >= the example length (or None for the model's position limit)")
        notes = () if matches else ("no attention was found in the model; it runs unchanged",)
        return PassResult(p.noted(*notes, ep=ep, spec=spec, example=example, matches=tuple(matches),
                                  signature=signature, samples=samples, source=p.model), True,
                          f"{len(matches)} site(s)")


class PriceOnly(ProgramPass[Program]):
    """With nothing to run (a model on the meta device): exact rewrites priced for the target, never measured.

    Exact rewrites only, unless the caller pinned variants; a pinned approximate variant says that its
    error was not measured.
    """

    name = "price only"

    def requires(self, p: Program) -> bool:
        return p.on_meta or p.samples is None

    def call(self, p: Program) -> PassResult[Program]:
        why = "meta device" if p.on_meta else "no samples"
        hw = pricing.profile(p.options.target)
        allowed = p.options.allowed
        rest = {k: v for k, v in allowed.items() if k == exact_name()} or allowed
        chosen = {}
        for m in p.matches:
            variant, params, _ = choose(m, rest)
            if variant is not None:
                chosen[m.site.index] = (variant, params)
        failures = rewrite_graph(p.ep.graph_module,
                                 [(m, *chosen[m.site.index]) for m in p.matches if m.site.index in chosen])
        decisions = []
        for m in p.matches:
            idx = m.site.index
            if idx not in chosen or idx in failures:
                decisions.append(Decision(m.site, "original", {}, None, None, failures.get(idx, m.site.reason)))
                continue
            variant, params = chosen[idx]
            exact = bool(VARIANTS[variant].exact(m.site, params))
            reason = f"{'exact;' if exact else 'approximate; error'} not measured ({why})"
            decisions.append(Decision(m.site, variant, params, pricing.predicted_speedup(m.site, variant, params, hw),
                                      0.0 if exact else None, reason))
        return PassResult(p.but(decisions=tuple(decisions), finished=True), bool(chosen),
                          f"priced, not measured ({why})")


class WeightSurgery(ProgramPass[Program]):
    """Apply the weight changes the plan chose to a copy of the model: factored K/V, merged heads, fitted maps."""

    name = "weight surgery"

    def requires(self, p: Program) -> bool:
        return bool(p.weights)

    def call(self, p: Program) -> PassResult[Program]:
        w, model, source, decisions, notes = p.weights, p.model, p.model, p.decisions, []
        if w.surgeries:  # latent: factor the K/V projections of a copy, then capture that
            source = apply_latent(model, [x for s in w.surgeries for x in ((s.k_proj, s.uk), (s.v_proj, s.uv))])
            before, after = parameter_count(model), parameter_count(source)
            removed = {s.site: (s.k_proj, s.v_proj) for s in w.surgeries}

            def fewer(index: int) -> str:
                n = sum(parameter_count(model.get_submodule(x.module)) - parameter_count(source.get_submodule(x.module))
                        for x in removed[index])
                return f"{-n:+,}"

            cache = {s.site: _kv_bytes(s, model) for s in w.surgeries}

            def kv(index: int) -> str:
                (b0, b1) = cache[index]
                return f"K/V {b0:,} -> {b1:,} bytes per token"

            decisions = tuple(
                dataclasses.replace(d, reason="; ".join(x for x in (
                    d.reason, f"K/V projections factored to rank {d.params.get('rank')}"
                    + (f" before the {d.params['rope']} rotary embedding" if d.params.get("rope") else "")
                    + f": {fewer(d.site.index)} parameters, {kv(d.site.index)}") if x))
                if d.site.index in removed else d for d in decisions)
            change = f"{before - after:,} fewer" if after <= before else f"{after - before:,} more"
            notes.append(f"latent weight surgery: {before:,} -> {after:,} parameters ({change})")
            kb0, kb1 = (sum(c[j] for c in cache.values()) for j in (0, 1))
            notes.append(f"latent K/V per token over the {len(cache)} factored site(s): {kb0:,} -> {kb1:,} bytes")
        if w.merges:  # gqa_merge: K/V heads merged in a copy
            before = parameter_count(source)
            source = apply_merge(source, [(x, n) for _, pk, pv, n in w.merges for x in (pk, pv)])
            notes.append(f"KV-head merging: {before:,} -> {parameter_count(source):,} parameters")
        if w.fitted:  # learned feature maps travel with the model as buffers
            source = attach_fitted(source, w.fitted)
        return PassResult(p.noted(*notes, source=source, decisions=decisions), True,
                          f"{len(w.surgeries)} factored, {len(w.merges)} merged, {len(w.fitted)} fitted")


def _kv_bytes(s, model: torch.nn.Module) -> tuple[int, int]:
    """(before, after) bytes of K and V one token adds at a factored site: G·(E + F) and G·2R elements."""
    size = next(model.get_submodule(s.k_proj.module).parameters()).element_size()
    before = s.k_proj.heads * s.k_proj.head_dim + s.v_proj.heads * s.v_proj.head_dim
    after = s.uk.shape[0] * s.uk.shape[1] + s.uv.shape[0] * s.uv.shape[1]
    return before * size, after * size


def chosen_of(decisions: tuple[Decision, ...]) -> dict[int, tuple[str, dict]]:
    """Site index -> (variant, params) for every site the plan rewrites."""
    return {d.site.index: (d.variant, d.params) for d in decisions if d.variant != "original"}


def rewrite_as(ep: torch.export.ExportedProgram, matches: list[Match],
               chosen: dict[int, tuple[str, dict]]) -> dict[int, str]:
    """Rewrite by the plan; a site whose planned rewrite fails on this capture runs exact dense instead.

    After weight surgery dense attention over the rebuilt K/V is the same math as the planned variant
    (slower), so the result stays what the plan measured; the failures are returned for the plan's notes.
    """
    failures = rewrite_planned(ep, matches, chosen)
    if failures:
        logger.warning("planned rewrite failed at re-capture for site(s) %s; they run dense: %s", sorted(failures),
                       failures)
        retry = {i: (exact_name(), {}) for i in failures}
        rewrite_planned(ep, [m for m in matches if m.site.index in retry], retry)
    return failures


def recapture(source: torch.nn.Module, chosen: dict[int, tuple[str, dict]], kw: dict) -> torch.export.ExportedProgram:
    """``source`` captured on ``kw`` and rewritten as the plan says (a new input shape's program)."""
    ep, _, matches, _ = analyse(source, kw)
    rewrite_as(ep, matches, chosen)
    return ep


class Rewrite(ProgramPass[Program]):
    """The final program: the planning graph as it stands, or a fresh capture when the model's structure changed."""

    name = "rewrite"

    def call(self, p: Program) -> PassResult[Program]:
        chosen = chosen_of(p.decisions)
        rebuild = functools.partial(recapture, p.source, chosen)
        if not (p.weights or any(drops_band(d.site, d.variant, d.params) for d in p.decisions)):
            return PassResult(p.but(rebuild=rebuild), False, "the planning graph is the program")
        # the final program differs in structure from the planning graph (factored projections, a site's
        # own band run by the window kernel instead of passed as a mask): capture it again
        ep, _, matches, _ = analyse(p.source, p.example_inputs)
        failed = rewrite_as(ep, matches, chosen)
        notes = tuple(f"site {i}: the planned rewrite could not be applied to the final capture ({why}); it runs "
                      "exact dense attention over the changed model instead" for i, why in sorted(failed.items()))
        return PassResult(p.noted(*notes, ep=ep, matches=tuple(matches), rebuild=rebuild), True, "captured again")


class EveryLength(ProgramPass[Program]):
    """One program for every sequence length up to ``max_len``, when the model can be captured so."""

    name = "every length"

    def requires(self, p: Program) -> bool:
        return p.options.dynamic and bool(p.matches)

    def call(self, p: Program) -> PassResult[Program]:
        got = every_length(p.source, p.example, list(p.matches), p.decisions, hardware(p.options.target),
                           p.options.max_len, p.options.budget is None, graph_context(p.ep))
        if got is None:
            return PassResult(p, False, "re-captured per input shape")
        ep, lengths, notes = got
        return PassResult(p.noted(*notes, ep=ep, lengths=lengths), True, f"lengths {lengths.low}..{lengths.high}")


PIPELINE: tuple[ProgramPass[Program], ...] = (
    BindInputs(), Capture(), PriceOnly(), Calibrate(), Choose(), WeightSurgery(), Rewrite(), EveryLength())


def optimize_program(model: torch.nn.Module, example_inputs: Any, calibration: Any, options: Options) -> Program:
    """Run ``PIPELINE`` on ``model``: the final state, from which ``plan_of`` builds the plan."""
    return run_passes(PIPELINE, Program(model, example_inputs, calibration, options))
