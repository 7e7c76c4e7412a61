"""The front door: ``find_attention`` and ``optimize``."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from passes.find import Match, find_matches
from passes.plan import Decision, Plan
from passes.pricing import predicted_speedup, profile
from passes.planner import VariantSpec, choose, normalise_variants
from passes.rewrite import rewrite_graph
from passes.site import AttentionSite
from rewriter.capture import CallSpec, capture, graph_context, split_inputs

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
    ref = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    cand = [t for t in torch.utils._pytree.tree_leaves(candidate) if isinstance(t, torch.Tensor) and t.is_floating_point()]
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


class OptimizedModel(torch.nn.Module):
    """A model whose attention sites call ``rewriter::attention``; same call signature and outputs."""

    def __init__(
        self,
        program: torch.export.ExportedProgram,
        spec: CallSpec,
        plan: Plan,
        rebuild=None,
        captured_for: Optional[str] = None,
    ):
        super().__init__()
        self.program = program
        self.spec = spec
        self.plan = plan
        self._module = program.module()
        self._rebuild = rebuild  # re-captures for new input shapes; None for a loaded artifact
        self._by_shape: dict[tuple, torch.nn.Module] = {}
        self.captured_for: Optional[str] = captured_for

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the rewritten program (re-capturing once per new input shape when the source model is known)."""
        kw = self.spec.bind(args, kwargs)
        key = input_signature(kw)
        if key == self.captured_for:
            return self._module(**kw)
        if self._rebuild is None:
            raise RuntimeError(
                f"this program was captured for inputs {self.captured_for} and got {key}; "
                "export one artifact per input shape, or optimize the model in this process."
            )
        if key not in self._by_shape:
            logger.info("new input shapes %s: capturing and rewriting again", key)
            self._by_shape[key] = self._rebuild(kw).module()
        return self._by_shape[key](**kw)


def _infer_target(example_inputs: Any) -> str:
    for t in torch.utils._pytree.tree_leaves(example_inputs):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return "cuda"
    return "cpu"


def _price(site: AttentionSite, variant: str, params: dict, target: str) -> Optional[float]:
    device = torch.cuda.get_device_name() if target == "cuda" and torch.cuda.is_available() else ""
    return predicted_speedup(site, variant, params, profile(target, device))


def _rewrite(ep, matches: list[Match], allowed, target: str = "cpu") -> list[Decision]:
    chosen, pending = [], []
    for m in matches:
        variant, params, reason = choose(m, allowed)
        pending.append((m, variant, params, reason))
        if variant is not None:
            chosen.append((m, variant, params))
    failures = rewrite_graph(ep.graph_module, chosen)
    decisions = []
    for m, variant, params, reason in pending:
        if variant is None or m.site.index in failures:
            decisions.append(Decision(m.site, "original", {}, None, None, failures.get(m.site.index, reason)))
        else:
            note = "; ".join((reason, *m.site.notes))
            speedup = _price(m.site, variant, params, target)
            decisions.append(Decision(m.site, variant, params, speedup, None, note))
    return decisions


def optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    budget: Optional[float] = 0.01,
    variants: VariantSpec = None,
    target: Optional[str] = None,
    calibration: Any = None,
) -> OptimizedModel:
    """Capture ``model``, rewrite every attention it can inside ``budget`` and return the optimized module."""
    allowed = normalise_variants(variants)
    target = target or _infer_target(example_inputs)
    if target not in ("cpu", "cuda"):
        raise ValueError(f"target must be 'cpu', 'cuda' or None, not {target!r}")
    ep, spec, matches, _ = _analyse(model, example_inputs)
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    # The captured graph before surgery: the rewrite's error is measured against it, so a fast path
    # eager mode takes (nested tensors for padding, say) is not charged to the rewrite.
    captured = None if on_meta else ep.module()
    decisions = _rewrite(ep, matches, allowed, target)
    notes = () if matches else ("no attention was found in the model; it runs unchanged",)

    def rebuild(kw: dict):
        ep2, _, matches2, _ = _analyse(model, kw)
        _rewrite(ep2, matches2, allowed)
        return ep2

    plan = Plan(tuple(decisions), target=target, budget=budget, notes=notes)
    args0, kwargs0 = split_inputs(example_inputs)
    signature = input_signature(spec.bind(args0, kwargs0))
    opt = OptimizedModel(ep, spec, plan, rebuild, captured_for=signature)
    if on_meta:
        return opt
    samples = calibration if isinstance(calibration, list) else [calibration if calibration is not None else example_inputs]
    errors, capture_gap = [], 0.0
    with torch.no_grad():
        for sample in samples:
            args, kwargs = split_inputs(sample)
            kw = spec.bind(args, kwargs)
            reference = captured(**kw)
            errors.append(relative_l2(reference, opt(*args, **kwargs)))
            capture_gap = max(capture_gap, relative_l2(model(*args, **{**spec.injected, **kwargs}), reference))
    error = max(errors)
    if capture_gap > 1e-4:
        notes = (*notes, f"note: the captured graph differs from eager by {capture_gap:.1e} (relative L2) before any "
                         "rewrite; eager took a path export does not trace (e.g. nested-tensor padding)")
    opt.plan = Plan(tuple(decisions), target=target, budget=budget, error=error, notes=notes)
    if budget is not None and error > budget:
        logger.warning("measured error %.2e exceeds the budget %.2e: every site stays as it was", error, budget)
        ep, spec, matches, _ = _analyse(model, example_inputs)
        kept = tuple(
            Decision(d.site, "original", {}, None, None, f"whole-model error {error:.1e} exceeded budget {budget:g}")
            for d in decisions
        )
        opt = OptimizedModel(ep, spec, Plan(kept, target=target, budget=budget, error=0.0, notes=notes), None,
                             captured_for=signature)
    return opt


__all__ = ["OptimizedModel", "find_attention", "optimize", "relative_l2"]
