"""Measuring a program on the calibration samples: the op nodes it runs, which rows are held out, the metric."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from passes import metrics
from passes.calibrate import SiteRecord

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


def batch_of(kw: dict) -> int:
    """The batch size of a bound call: dim 0 of its first tensor input (1 when it has none)."""
    for t in kw.values():
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


def restrict(rec: SiteRecord, rows: tuple[int, ...], batch: int) -> Optional[SiteRecord]:
    """The record's calibration rows (when the op's batch is the sample's batch), else the whole record."""
    if rec.q.shape[0] != batch or len(rows) == batch:
        return rec
    if not rows:
        return None
    idx = torch.as_tensor(rows, dtype=torch.long)

    def pick(t):
        return t if t is None or t.dim() == 0 or t.shape[0] != batch else t.index_select(0, idx)

    def pick4(t):  # extra operands broadcast to [B, G, M, E]: only a 4-d one carries the batch
        return t if t.dim() != 4 else pick(t)

    return SiteRecord(pick(rec.q), pick(rec.k), pick(rec.v), pick(rec.mask), pick(rec.out), rec.scale,
                      rec.causal, rec.softcap, rec.fill, pick(rec.rows), tuple(pick4(t) for t in rec.extra))


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
                b = batch_of(kw)
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
