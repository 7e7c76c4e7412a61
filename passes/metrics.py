"""What the budget measures: the error of a model's outputs against the original's.

By default the relative L2 error over positions that mean something: rows at padded positions
(marked by a padding mask among the inputs) are left out, their outputs are junk in the original
too. ``"kl"`` compares next-token distributions (language models), ``"cosine"`` pooled embeddings
(1 - mean cosine similarity); a callable ``(reference, outputs) -> float`` is used as given.
Errors can be measured on a subset of batch rows, which is how calibration holds rows back.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

Metric = Union[None, str, Callable[[Any, Any], float]]
METRICS = ("l2", "kl", "cosine")


def validate(metric: Metric) -> None:
    """Raise a ValueError naming the accepted metrics when ``metric`` is not one of them."""
    if metric is None or callable(metric) or metric in METRICS:
        return
    raise ValueError(f"unknown metric {metric!r}; use None (relative L2), 'kl', 'cosine' or a callable "
                     "(reference_outputs, outputs) -> float")


def padding_rows(inputs: dict) -> Optional[torch.Tensor]:
    """A [B, N] bool tensor of meaningful positions, read from a 2-D 0/1 padding-mask input, or None."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or "mask" not in name.lower():
            continue
        if t.dtype == torch.bool:
            return t
        if not t.is_floating_point() or bool(((t == 0) | (t == 1)).all()):
            return t != 0
    return None


def _float_leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def select_rows(x: Any, rows: Sequence[int], batch: int) -> Any:
    """Every tensor in ``x`` whose first dim is the batch, restricted to ``rows``."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    return tree_map(lambda t: t.index_select(0, idx.to(t.device))
                    if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch else t, x)


def _valid(t: torch.Tensor, pad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if pad is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(pad.shape):
        return None
    return pad


def sums(reference: Any, outputs: Any, metric: Metric, pad: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(numerator, denominator) of the metric over the outputs, so errors pool across samples."""
    if callable(metric):
        return float(metric(reference, outputs)), 1.0
    ref, out = _float_leaves(reference), _float_leaves(outputs)
    if len(ref) != len(out):
        raise ValueError(f"outputs differ in structure: {len(ref)} tensors against {len(out)}")
    num = den = 0.0
    for a, b in zip(ref, out):
        a, b = a.detach().double(), b.detach().double()
        valid = _valid(a, pad)
        if metric == "kl":
            if a.dim() < 2:
                continue
            kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
            if valid is not None:
                kl = kl[valid.to(kl.device)]
            num, den = num + float(kl.sum()), den + kl.numel()
        elif metric == "cosine":
            if valid is not None:
                w = valid.to(a.device, a.dtype).unsqueeze(-1)
                a = (a * w).sum(1) / w.sum(1).clamp(min=1)
                b = (b * w).sum(1) / w.sum(1).clamp(min=1)
            cos = F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=-1)
            num, den = num + float((1 - cos).sum()), den + cos.numel()
        else:
            d, r = (a - b).pow(2), a.pow(2)
            if valid is not None:
                v = valid.to(a.device)
                d, r = d[v], r[v]
            num, den = num + float(d.sum()), den + float(r.sum())
    return num, den


def finish(num: float, den: float, metric: Metric) -> float:
    """The metric's value from pooled sums."""
    if callable(metric) or metric in ("kl", "cosine"):
        return num / den if den > 0 else 0.0
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def error(reference: Any, outputs: Any, metric: Metric = None, pad: Optional[torch.Tensor] = None) -> float:
    """The metric between two outputs of the same structure."""
    return finish(*sums(reference, outputs, metric, pad), metric)
