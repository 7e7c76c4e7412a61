"""The front door: ``find_attention`` and ``optimize``."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import torch

from passes.context import first_line
from passes.find import Match, find_matches
from passes.lower import lower_dense
from passes.metrics import Metric, check_perplexity
from passes.metrics import validate as validate_metric
from passes.pipeline import plan_program, plan_unmeasured
from passes.plan import Decision, Plan
from passes.planner import DEFAULT_SITE_CAP, VariantSpec, drops_band, normalise_variants
from passes.pricing import TARGETS, profile, profile_note
from passes.site import AttentionSite
from passes.surgery import apply_latent, apply_merge, attach_fitted, parameter_count, rewrite_planned
from passes.variants import exact_name
from rewriter.capture import CallSpec, CaptureError, call_spec, capture, graph_context, split_inputs
from rewriter.dynamic import LengthRange, every_length, example_length
from rewriter.runner import flat_runner

logger = logging.getLogger(__name__)


def _analyse(model: torch.nn.Module, example_inputs: Any):
    t0 = time.perf_counter()
    logger.info("capturing %s with torch.export (non-strict)...", type(model).__name__)
    ep, spec = capture(model, example_inputs)
    logger.info("captured %d graph nodes in %.1fs; finding attention...", len(ep.graph.nodes), time.perf_counter() - t0)
    ctx = graph_context(ep)
    matches, rejected = find_matches(ctx)
    logger.info("found %d attention site(s) (%d softmaxes were not attention)", len(matches), len(rejected))
    return ep, spec, matches, rejected


def find_attention(model: torch.nn.Module, example_inputs: Any) -> list[AttentionSite]:
    """Every attention in ``model`` on ``example_inputs``, found from the captured graph's dataflow."""
    _, _, matches, _ = _analyse(model, example_inputs)
    return [m.site for m in matches]


def relative_l2(reference: Any, candidate: Any) -> float:
    """Relative L2 distance between two outputs with the same structure (all float tensors pooled)."""
    ref = [t for t in torch.utils._pytree.tree_leaves(reference)
           if isinstance(t, torch.Tensor) and t.is_floating_point()]
    cand = [t for t in torch.utils._pytree.tree_leaves(candidate)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(ref) != len(cand):
        raise ValueError(f"outputs differ in structure: {len(ref)} tensors against {len(cand)}")
    num = sum(float((a.detach().double() - b.detach().double()).pow(2).sum()) for a, b in zip(ref, cand))
    den = sum(float(a.detach().double().pow(2).sum()) for a in ref)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def input_signature(kwargs: dict) -> str:
    """The shapes and dtypes of a call's inputs, as text: one captured program serves one signature."""
    return repr(tuple(
        (k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v)) for k, v in kwargs.items()
    ))


def shapes_of(kw: dict) -> dict:
    """The shapes and dtypes of keyword inputs (what a length range is checked against), JSON-ready."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} if isinstance(v, torch.Tensor) else {"value": repr(v)}
            for k, v in kw.items()}


class OptimizedModel(torch.nn.Module):
    """A model whose attention sites call ``rewriter::attention``; same call signature and outputs."""

    def __init__(
        self,
        program: torch.export.ExportedProgram,
        spec: CallSpec,
        plan: Plan,
        rebuild=None,
        captured_for: Optional[str] = None,
        lengths: Optional[LengthRange] = None,
        example_shapes: Optional[dict] = None,
    ):
        super().__init__()
        lower_dense(program.graph_module, plan.target)  # exact dense sites call SDPA itself on the CPU
        self.program = program
        self.spec = spec
        self.plan = plan
        self._module = program.module()
        self._run = flat_runner(program) or self._module  # weights bound once: eager's per-call cost
        self._rebuild = rebuild  # re-captures for new input shapes; None for a loaded artifact
        self._by_shape: dict[tuple, torch.nn.Module] = {}
        self.captured_for: Optional[str] = captured_for
        self.lengths = lengths  # the sequence lengths one dynamic program serves, when it was captured so
        self.example_shapes = example_shapes or {}
        self._example_meta: Optional[dict] = None

    def _example(self) -> dict:
        """The captured example as meta tensors and values (built once: ``_serves`` runs on every call)."""
        if self._example_meta is None:
            self._example_meta = {
                k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"].replace("torch.", "")), device="meta")
                if "shape" in v else _Repr(v["value"]) for k, v in self.example_shapes.items()}
        return self._example_meta

    def _serves(self, kw: dict) -> bool:
        return self.lengths is not None and self.lengths.accepts(kw, self._example())

    def _length(self, kw: dict) -> Optional[int]:
        """The call's sequence length, when this program has a length range and the call is otherwise its shape."""
        if self.lengths is None or not LengthRange(self.lengths.names, 0, 2 ** 62).accepts(kw, self._example()):
            return None
        return int(kw[self.lengths.names[0]].shape[1])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the rewritten program (re-capturing once per new input shape when the source model is known)."""
        kw = self.spec.bind(args, kwargs)
        key = input_signature(kw)
        if key == self.captured_for or self._serves(kw):
            return self._run(**kw)
        if self._rebuild is None:
            served = "" if self.lengths is None else (
                f" (it serves sequence lengths {self.lengths.low}..{self.lengths.high} of {list(self.lengths.names)})")
            n = self._length(kw)
            if n is not None and n > self.lengths.high:
                raise RuntimeError(
                    f"sequence length {n} is beyond this program's max_len={self.lengths.high}{served}; "
                    "optimize the model again with a larger max_len= and export that")
            raise RuntimeError(
                f"this program was captured for inputs {self.captured_for}{served} and got {key}; "
                "export one artifact per input shape, or optimize the model in this process."
            )
        if key not in self._by_shape:
            logger.info("new input shapes %s: capturing and rewriting again", key)
            ep = self._rebuild(kw)
            lower_dense(ep.graph_module, self.plan.target)
            self._by_shape[key] = flat_runner(ep) or ep.module()
        return self._by_shape[key](**kw)


class _Repr:
    """A non-tensor input, compared by its repr."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _infer_target(example_inputs: Any) -> str:
    for t in torch.utils._pytree.tree_leaves(example_inputs):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return "cuda"
    return "cpu"


def _removed(model: torch.nn.Module, source: torch.nn.Module, projs) -> str:
    n = sum(parameter_count(model.get_submodule(p.module)) - parameter_count(source.get_submodule(p.module))
            for p in projs)
    return f"{n:,}"


def _check_budget(budget: Any) -> Optional[float]:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget != budget:
        raise TypeError(f"budget must be a number >= 0 or None (no accuracy gate), not {budget!r}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0 (the largest output error allowed) or None for no gate, not {budget}")
    return float(budget)


def _check_cap(cap: Any) -> Optional[float]:
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"site_cap must be a number > 0 (the largest site error allowed) or None, not {cap!r}")
    return float(cap)


def _samples(calibration: Any, example_inputs: Any, spec: CallSpec, signature: str) -> list[dict]:
    """Calibration samples bound to the captured inputs; a clear error before any work if one does not fit."""
    raw = calibration if isinstance(calibration, list) else [example_inputs if calibration is None else calibration]
    if not raw:
        raise ValueError("calibration is an empty list; pass at least one sample (or None to use example_inputs)")
    out = []
    for i, sample in enumerate(raw):
        args, kwargs = split_inputs(sample)
        try:
            kw = spec.bind(args, kwargs)
        except TypeError as e:
            raise ValueError(f"calibration sample {i} does not fit the model's inputs: {e}") from None
        got = input_signature(kw)
        if got != signature:
            raise ValueError(
                f"calibration sample {i} has inputs {got}, but the model was captured for {signature}; "
                "pass calibration samples with the example inputs' shapes and dtypes (batch several sequences "
                "into one sample, or pad them to the example's length)")
        out.append(kw)
    return out


def _decisions_for(plan: Plan) -> dict[int, tuple[str, dict]]:
    return {d.site.index: (d.variant, d.params) for d in plan.decisions if d.variant != "original"}


def _rewrite_as(ep, matches: list[Match], chosen: dict[int, tuple[str, dict]]) -> dict[int, str]:
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


def optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    budget: Optional[float] = 0.01,
    metric: Metric = None,
    variants: VariantSpec = None,
    target: Optional[str] = None,
    calibration: Any = None,
    dynamic: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    site_cap: Optional[float] = DEFAULT_SITE_CAP,
    max_len: Optional[int] = None,
) -> OptimizedModel:
    """Capture ``model``, rewrite every attention it can inside ``budget`` and return the optimized module.

    ``budget`` is the largest model error allowed, measured by ``metric`` (None: chosen from what the
    model returns, see ``passes.metrics``; the plan says which and why); None applies the given variants
    with no accuracy gate. ``site_cap`` is the largest error any one approximate site may have (relative
    L2 of its attention output), however little of it reaches the output on the calibration data.
    ``calibration`` is a sample or a list of samples shaped like ``example_inputs``; a share of their
    batch rows is held back to measure the plan. With ``dynamic``,
    the result is one program (and one artifact) for every sequence length from 1 to ``max_len``, when
    the model can be captured so; ``max_len`` defaults to the model's position limit (a position table,
    or a config field such as ``max_position_embeddings``), else 8x the example length. Exact and forced
    variants run at every length; a planned approximate site runs dense below the length where the cost
    model says its variant starts to pay, and exact dense beyond the length it was calibrated on.
    ``progress`` receives one line per planning step (capture, calibration, fitting, search).

    Raises CaptureError (one line, naming the backend route) when torch.export cannot capture the model,
    and ValueError / TypeError for arguments that do not fit; any other failure after capture leaves the
    model unchanged, with the plan saying why.
    """
    try:
        return _optimize(model, example_inputs, budget, metric, variants, target, calibration, dynamic, progress,
                         site_cap, max_len)
    except (CaptureError, ValueError, TypeError):
        raise
    except Exception as e:  # never a stray traceback from inside planning: the model runs as it was
        logger.warning("optimize failed after capture (%s: %s); the model runs unchanged", type(e).__name__, e,
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        return _unchanged(model, example_inputs, budget, target or _infer_target(example_inputs),
                          f"planning failed ({type(e).__name__}: {first_line(e)}); the model runs unchanged")


def _unchanged(model: torch.nn.Module, example_inputs: Any, budget: Optional[float], target: str,
               why: str) -> OptimizedModel:
    """The model captured again and left as it was, every site's decision saying ``why``."""
    ep, spec, matches, _ = _analyse(model, example_inputs)
    args0, kwargs0 = split_inputs(example_inputs)
    decisions = tuple(Decision(m.site, "original", {}, None, None, why) for m in matches)
    plan = Plan(decisions, target=target, budget=budget, notes=(why,))
    return OptimizedModel(ep, spec, plan, lambda kw: _analyse(model, kw)[0],
                          captured_for=input_signature(spec.bind(args0, kwargs0)))


def _optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    budget: Optional[float],
    metric: Metric,
    variants: VariantSpec,
    target: Optional[str],
    calibration: Any,
    dynamic: bool,
    progress: Optional[Callable[[str], None]],
    site_cap: Optional[float],
    max_len: Optional[int] = None,
) -> OptimizedModel:
    """``optimize`` itself (the public function adds the guarantee that only deliberate errors escape)."""
    budget = _check_budget(budget)
    site_cap = _check_cap(site_cap)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int (the longest sequence one program serves) or None, "
                         f"not {max_len!r}")
    validate_metric(metric)
    allowed = normalise_variants(variants)
    target = target or _infer_target(example_inputs)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))} or None (the inputs' device), "
                         f"not {target!r}")
    args0, kwargs0 = split_inputs(example_inputs)
    spec0 = call_spec(model, args0, kwargs0)
    signature = input_signature(spec0.bind(args0, kwargs0)) if not spec0.var_positional else None
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    samples = None
    if not on_meta and signature is not None:
        samples = _samples(calibration, example_inputs, spec0, signature)
    if metric == "perplexity" and samples:  # the model must return token logits: say so before any work
        with torch.no_grad():
            check_perplexity(samples[0], spec0.call(model, samples[0]))
    if progress:
        progress(f"capturing {type(model).__name__} with torch.export")
    ep, spec, matches, _ = _analyse(model, example_inputs)
    if progress:
        progress(f"found {len(matches)} attention site(s)")
    if signature is None:
        signature = input_signature(spec.bind(args0, kwargs0))
        samples = None if on_meta else _samples(calibration, example_inputs, spec, signature)
    notes = () if matches else ("no attention was found in the model; it runs unchanged",)
    if on_meta or samples is None:  # nothing to run: priced for the target, never measured
        plan = plan_unmeasured(ep, matches, allowed, target, budget, "meta device" if on_meta else "no samples",
                               notes)
        return OptimizedModel(ep, spec, plan, None, captured_for=signature)
    # The captured graph before surgery is the reference: a fast path eager mode takes (nested tensors
    # for padding, say) is not charged to the rewrite.
    captured = ep.module()
    planned = plan_program(ep, matches, samples, captured, budget, allowed, target, metric, progress=progress,
                           site_cap=site_cap)
    plan = planned.plan
    if target == "cpu":  # say so when the times behind the plan were not measured on this machine
        hw = profile("cpu")
        note = profile_note(hw)
        plan = dataclasses.replace(plan, calibrated=not hw.source.startswith("generic"),
                                   notes=plan.notes + ((note,) if note else ()))
    source = model
    if planned.surgeries:  # latent: factor the K/V projections of a copy, then capture that
        source = apply_latent(model, [x for s in planned.surgeries for x in ((s.k_proj, s.uk), (s.v_proj, s.uv))])
        before, after = parameter_count(model), parameter_count(source)
        removed = {s.site: (s.k_proj, s.v_proj) for s in planned.surgeries}
        decisions = tuple(
            dataclasses.replace(d, reason="; ".join(x for x in (
                d.reason, f"K/V projections factored to rank {d.params.get('rank')}: "
                f"-{_removed(model, source, removed[d.site.index])} parameters") if x))
            if d.site.index in removed else d for d in plan.decisions)
        plan = dataclasses.replace(plan, decisions=decisions, notes=(*plan.notes, (
            f"latent weight surgery: {before:,} -> {after:,} parameters ({before - after:,} fewer)")))
    if planned.merges:  # gqa_merge: K/V heads merged in a copy
        before = parameter_count(source)
        source = apply_merge(source, [(p, n) for _, pk, pv, n in planned.merges for p in (pk, pv)])
        plan = dataclasses.replace(plan, notes=(*plan.notes, (
            f"KV-head merging: {before:,} -> {parameter_count(source):,} parameters")))
    if planned.fitted:  # learned feature maps travel with the model as buffers
        source = attach_fitted(source, planned.fitted)
    capture_gap = 0.0
    with torch.no_grad():
        kw = samples[0]
        capture_gap = relative_l2(spec.call(model, kw), captured(**kw))
    if capture_gap > 1e-4:
        notes = (*notes, f"note: the captured graph differs from eager by {capture_gap:.1e} (relative L2) before any "
                         "rewrite; eager took a path export does not trace (e.g. nested-tensor padding)")
    plan = dataclasses.replace(plan, notes=(*plan.notes, *notes))
    chosen = _decisions_for(plan)

    def rebuild(kw: dict):
        ep2, _, matches2, _ = _analyse(source, kw)
        _rewrite_as(ep2, matches2, chosen)
        return ep2

    kw0 = spec.bind(args0, kwargs0)
    example_len = example_length(kw0, matches)
    if max_len is not None and example_len is not None and max_len < example_len:
        raise ValueError(f"max_len={max_len} is shorter than the example inputs' sequence length {example_len}; "
                         "pass max_len >= the example length (or None for the model's position limit)")
    if (planned.surgeries or planned.fitted or planned.merges
            or any(drops_band(d.site, d.variant, d.params) for d in plan.decisions)):
        # the final program differs in structure from the planning graph (factored projections, a site's
        # own band run by the window kernel instead of passed as a mask): capture it again
        ep2, _, matches, _ = _analyse(source, example_inputs)
        failed = _rewrite_as(ep2, matches, chosen)
        ep = ep2
        if failed:
            plan = dataclasses.replace(plan, notes=(*plan.notes, *(
                f"site {i}: the planned rewrite could not be applied to the final capture ({why}); it runs exact "
                "dense attention over the changed model instead" for i, why in sorted(failed.items()))))
    if dynamic and matches:
        hw = profile(target, torch.cuda.get_device_name() if target == "cuda" and torch.cuda.is_available() else "")
        got = every_length(source, kw0, matches, plan, hw, max_len, budget is None, graph_context(ep))
        if got is not None:
            ep_dyn, rng, notes = got
            plan = dataclasses.replace(plan, notes=(*plan.notes, *notes))
            return OptimizedModel(ep_dyn, spec, plan, rebuild, captured_for=signature, lengths=rng,
                                  example_shapes=shapes_of(kw0))
    return OptimizedModel(ep, spec, plan, rebuild, captured_for=signature)


__all__ = ["OptimizedModel", "find_attention", "optimize", "relative_l2"]
