"""The front door: ``find_attention`` and ``optimize``."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from passes.capture import CallSpec, CaptureError, analyse, split_inputs
from passes.context import first_line
from passes.dynamic import LengthRange
from passes.lower import lower_dense
from passes.metrics import Metric, relative_l2
from passes.options import check_options, infer_target, input_signature, shapes_of
from passes.pipeline import optimize_program
from passes.plan import Decision, Plan
from passes.planner import DEFAULT_SITE_CAP, VariantSpec
from passes.site import AttentionSite
from passes.state import plan_of
from rewriter.runner import flat_runner

logger = logging.getLogger(__name__)


def find_attention(model: torch.nn.Module, example_inputs: Any) -> list[AttentionSite]:
    """Every attention in ``model`` on ``example_inputs``, found from the captured graph's dataflow."""
    _, _, matches, _ = analyse(model, example_inputs)
    return [m.site for m in matches]


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
    distributed: bool = False,
    checkpoint: Optional[str] = None,
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

    With ``distributed``, every rank of an initialised process group calls this alike: the model is split
    into one pipeline stage per rank, each rank calibrates its own stage's sites and rank 0 plans the whole
    model; the result is that rank's ``rewriter.distributed.StageModel``. A model built with its
    parameters on the meta device loads each stage's weights from ``checkpoint`` (safetensors shards).

    Raises CaptureError (one line, naming the backend route) when torch.export cannot capture the model,
    and ValueError / TypeError for arguments that do not fit; any other failure after capture leaves the
    model unchanged, with the plan saying why.
    """
    if distributed:
        from rewriter.distributed import optimize_distributed
        return optimize_distributed(model, example_inputs, budget, metric, variants, target, calibration, progress,
                                    site_cap, checkpoint)
    try:
        return _optimize(model, example_inputs, budget, metric, variants, target, calibration, dynamic, progress,
                         site_cap, max_len)
    except (CaptureError, ValueError, TypeError):
        raise
    except Exception as e:  # never a stray traceback from inside planning: the model runs as it was
        logger.warning("optimize failed after capture (%s: %s); the model runs unchanged", type(e).__name__, e,
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        return _unchanged(model, example_inputs, budget, target or infer_target(example_inputs),
                          f"planning failed ({type(e).__name__}: {first_line(e)}); the model runs unchanged")


def _unchanged(model: torch.nn.Module, example_inputs: Any, budget: Optional[float], target: str,
               why: str) -> OptimizedModel:
    """The model captured again and left as it was, every site's decision saying ``why``."""
    ep, spec, matches, _ = analyse(model, example_inputs)
    args0, kwargs0 = split_inputs(example_inputs)
    decisions = tuple(Decision(m.site, "original", {}, None, None, why) for m in matches)
    plan = Plan(decisions, target=target, budget=budget, notes=(why,))
    return OptimizedModel(ep, spec, plan, lambda kw: analyse(model, kw)[0],
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
    options = check_options(example_inputs, budget, metric, variants, target, site_cap, max_len, dynamic, progress)
    p = optimize_program(model, example_inputs, calibration, options)
    return OptimizedModel(p.ep, p.spec, plan_of(p), p.rebuild, captured_for=p.signature, lengths=p.lengths,
                          example_shapes=shapes_of(p.example) if p.lengths is not None else None)


__all__ = ["OptimizedModel", "find_attention", "optimize", "relative_l2"]
