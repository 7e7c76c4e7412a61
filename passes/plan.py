"""The plan: one decision per attention site, readable by people and round-trippable as JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from passes.metrics import DESCRIPTIONS
from passes.site import AttentionSite


@dataclass(frozen=True)
class Decision:
    """What the planner chose for one site and why."""

    site: AttentionSite
    variant: str  # the variant the site now runs, or "original" when it stays as it was
    params: dict = field(default_factory=dict)
    predicted_speedup: Optional[float] = None  # from the cost model; None until it prices this site
    error: Optional[float] = None  # measured relative L2 error of the site's output on calibration records
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    """Every site's decision plus what was measured for the whole model."""

    decisions: tuple[Decision, ...]
    target: str = "cpu"
    budget: Optional[float] = None
    error: Optional[float] = None  # measured end-to-end error (the metric) on the calibration rows
    notes: tuple[str, ...] = ()
    holdout_error: Optional[float] = None  # the same on rows held back from fitting and choosing
    metric: str = "l2"
    calibrated: Optional[bool] = None  # False: predicted times came from generic, not measured, hardware figures
    metric_reason: str = ""  # why this metric (the caller's, or the default for what the model returns)
    site_cap: Optional[float] = None  # no approximate site was allowed a site error above this

    @property
    def sites(self) -> list[AttentionSite]:
        """The sites in graph order."""
        return [d.site for d in self.decisions]

    def __str__(self) -> str:
        if not self.decisions:
            lines = ["Plan: no attention found in the model; it runs unchanged."]
        else:
            header = ("#", "site", "shape", "flags", "variant", "speedup", "site error", "reason")
            rows = [header]
            for d in self.decisions:
                s = d.site
                heads = f"{_n(s.num_heads)}h" + (f"/{_n(s.num_kv_heads)}kv" if s.num_kv_heads != s.num_heads else "")
                flags = ",".join(
                    x for x in (
                        "causal?" if s.causal is None else ("causal" if s.causal else ""),
                        "cross" if s.is_cross else "",
                        s.mask_kind if s.mask_kind not in ("none", "causal") else "",
                    ) if x
                )
                rows.append((
                    str(s.index),
                    s.name or "<top>",
                    f"{heads} d{_n(s.head_dim)} q{_n(s.q_len)} kv{_n(s.kv_len)}",
                    flags,
                    d.variant + (f"({_params(d.params)})" if d.params else ""),
                    "-" if d.predicted_speedup is None else f"{d.predicted_speedup:.2f}x",
                    "-" if d.error is None else f"{d.error:.1e}",
                    d.reason,
                ))
            widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
            lines = [
                "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows
            ]
            lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
            rewritten = sum(d.variant != "original" for d in self.decisions)
            lines.append(f"{rewritten} of {len(self.decisions)} attention sites rewritten; target={self.target}")
        if self.error is not None:
            budget = "none" if self.budget is None else f"{self.budget:g}"
            what = DESCRIPTIONS.get(self.metric, self.metric)
            if self.metric == "perplexity":
                held = "" if self.holdout_error is None else f", held-out {100 * self.holdout_error:+.2f}%"
                budget = "none" if self.budget is None else f"+{100 * self.budget:g}%"
                lines.append(f"measured perplexity change: calibration {100 * self.error:+.2f}%{held}; "
                             f"budget: {budget}")
            else:
                held = "" if self.holdout_error is None else f", held-out {self.holdout_error:.2e}"
                words = _in_words(self.metric, self.budget) if self.budget is not None else ""
                lines.append(f"measured model error ({what}): calibration {self.error:.2e}{held}; budget: {budget}"
                             + (f" ({words})" if words else ""))
            if self.metric_reason:
                lines.append(f"metric: {self.metric} ({self.metric_reason})")
            if self.site_cap is not None:
                errs = [d.error for d in self.decisions if d.error is not None and d.variant != "original"]
                worst = f"; largest site error {max(errs):.2g}" if errs else ""
                lines.append(f"site cap: no approximate site above site error {self.site_cap:g} "
                             f"(relative L2 of the attention output){worst}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the plan."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Plan":
        """Rebuild a plan written by ``to_json``."""
        decisions = tuple(
            Decision(**{**d, "site": AttentionSite(**{**d["site"], "notes": tuple(d["site"].get("notes", ()))})})
            for d in data.get("decisions", [])
        )
        return Plan(
            decisions=decisions,
            target=data.get("target", "cpu"),
            budget=data.get("budget"),
            error=data.get("error"),
            notes=tuple(data.get("notes", ())),
            holdout_error=data.get("holdout_error"),
            metric=data.get("metric", "l2"),
            calibrated=data.get("calibrated"),
            metric_reason=data.get("metric_reason", ""),
            site_cap=data.get("site_cap"),
        )

    def dumps(self) -> str:
        """The plan as indented JSON text."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True)


def _in_words(metric: str, budget: float) -> str:
    """What a budget means in the user's terms."""
    if metric == "cosine":
        return f"embedding cosine at least {1 - budget:g}"
    if metric == "l2":
        return f"outputs within {100 * budget:.3g}% relative L2"
    return ""


def _params(p: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(p.items()))


def _n(x: int) -> str:
    """A size for the table; -1 is one the finder does not know (data-dependent, or a refused site)."""
    return "?" if x < 0 else str(x)
