"""The state ``optimize``'s passes hand one another, and the one place a ``Plan`` is built from it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from passes.capture import CallSpec
from passes.find import Match
from passes.options import Options
from passes.plan import Decision, Plan
from passes.surgery import Projection


@dataclass(frozen=True)
class Surgery:
    """Latent weight surgery one site needs: its K and V projections and the per-head bases."""

    site: int
    k_proj: Projection
    uk: torch.Tensor
    v_proj: Projection
    uv: torch.Tensor


@dataclass(frozen=True)
class Weights:
    """The weight changes the chosen plan needs before the final capture (all empty when none)."""

    surgeries: tuple[Surgery, ...] = ()
    fitted: tuple[tuple[int, tuple[torch.Tensor, ...]], ...] = ()  # (site, tensors the op takes as extra)
    merges: tuple[tuple[int, Projection, Projection, int], ...] = ()  # (site, K proj, V proj, merged heads)

    def __bool__(self) -> bool:
        return bool(self.surgeries or self.fitted or self.merges)


@dataclass(frozen=True)
class Measured:
    """What was measured for the whole model (the plan's summary fields)."""

    error: Optional[float] = None
    holdout_error: Optional[float] = None
    metric: str = "l2"
    metric_reason: str = ""
    site_cap: Optional[float] = None
    calibrated: Optional[bool] = None


@dataclass(frozen=True)
class Program:
    """Everything one ``optimize`` call knows so far; each pass returns a new one."""

    model: torch.nn.Module  # the user's model: never changed
    example_inputs: Any
    calibration: Any
    options: Options
    signature: Optional[str] = None  # the captured inputs' shapes and dtypes, as text
    samples: Optional[tuple[dict, ...]] = None  # calibration samples bound to keywords; None: nothing to run
    on_meta: bool = False
    ep: Optional[torch.export.ExportedProgram] = None  # the program being rewritten
    spec: Optional[CallSpec] = None
    example: dict = field(default_factory=dict)  # the example inputs bound to keywords
    matches: tuple[Match, ...] = ()
    planning: Any = None  # what calibration and the search hand on (``passes.choose.Planning``)
    decisions: tuple[Decision, ...] = ()
    notes: tuple[str, ...] = ()
    measured: Measured = Measured()
    weights: Weights = Weights()
    source: Optional[torch.nn.Module] = None  # what the final program is captured from (a copy after surgery)
    rebuild: Optional[Callable[[dict], torch.export.ExportedProgram]] = None  # re-capture for a new input shape
    lengths: Any = None  # the ``passes.dynamic.LengthRange`` one program serves, when captured so
    finished: bool = False

    def but(self, **changes: Any) -> "Program":
        """This state with ``changes``."""
        return dataclasses.replace(self, **changes)

    def noted(self, *notes: str, **changes: Any) -> "Program":
        """This state with ``notes`` appended (and ``changes``)."""
        return dataclasses.replace(self, notes=(*self.notes, *notes), **changes)


def plan_of(program: Program) -> Plan:
    """The plan the passes made: built once, at the end."""
    m = program.measured
    return Plan(program.decisions, target=program.options.target, budget=program.options.budget, error=m.error,
                notes=program.notes, holdout_error=m.holdout_error, metric=m.metric, calibrated=m.calibrated,
                metric_reason=m.metric_reason, site_cap=m.site_cap)
