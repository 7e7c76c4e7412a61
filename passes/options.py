"""What the user asked ``optimize`` for, checked once before any work, and the inputs bound to the model."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from passes.capture import CallSpec, split_inputs
from passes.metrics import Metric
from passes.metrics import validate as validate_metric
from passes.planner import VariantSpec, normalise_variants
from passes.pricing import TARGETS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """The checked arguments of one ``optimize`` call."""

    budget: Optional[float]
    metric: Metric
    allowed: dict  # variant name -> fixed params, or None for the planner's grid
    target: str
    site_cap: Optional[float]
    max_len: Optional[int]
    dynamic: bool = True
    progress: Optional[Callable[[str], None]] = None

    def say(self, message: str) -> None:
        """One line of progress: to the caller's callback, else to the log."""
        if self.progress:
            self.progress(message)
        else:
            logger.info("%s", message)


def check_options(example_inputs: Any, budget: Any, metric: Metric, variants: VariantSpec, target: Optional[str],
                  site_cap: Any, max_len: Any, dynamic: bool = True,
                  progress: Optional[Callable[[str], None]] = None) -> Options:
    """The arguments as ``Options``; a ValueError or TypeError that says what to pass when one does not fit."""
    budget, site_cap = _check_budget(budget), _check_cap(site_cap)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int (the longest sequence one program serves) or None, "
                         f"not {max_len!r}")
    validate_metric(metric)
    allowed = normalise_variants(variants)
    target = target or infer_target(example_inputs)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))} or None (the inputs' device), "
                         f"not {target!r}")
    return Options(budget, metric, allowed, target, site_cap, max_len, bool(dynamic), progress)


def infer_target(example_inputs: Any) -> str:
    """``cuda`` when any input tensor is on a CUDA device, else ``cpu``."""
    for t in torch.utils._pytree.tree_leaves(example_inputs):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return "cuda"
    return "cpu"


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


def input_signature(kwargs: dict) -> str:
    """The shapes and dtypes of a call's inputs, as text: one captured program serves one signature."""
    return repr(tuple(
        (k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v)) for k, v in kwargs.items()
    ))


def shapes_of(kw: dict) -> dict:
    """The shapes and dtypes of keyword inputs (what a length range is checked against), JSON-ready."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} if isinstance(v, torch.Tensor) else {"value": repr(v)}
            for k, v in kw.items()}


def bind_samples(calibration: Any, example_inputs: Any, spec: CallSpec, signature: str) -> tuple[dict, ...]:
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
    return tuple(out)
