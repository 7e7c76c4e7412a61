"""``adaptive``: dispatch by sequence length to the variant planned for that length range.

One captured program with a dynamic length serves every length in its range; where the cost model
says the cheapest variant changes with length (dense at short lengths, a sparse or linear variant
at long ones), the op carries the schedule and picks at run time::

    params = {"schedule": [[min_len, variant, params], ...]}   # ascending min_len, the first is 0

The query length picks the last entry whose ``min_len`` it reaches.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.ops import KERNELS, register_kernel


def pick(schedule: Sequence, length: int) -> tuple[str, dict]:
    """The (variant, params) a schedule assigns to ``length``."""
    chosen = None
    for entry in schedule:
        min_len, variant, params = entry
        if length >= int(min_len):
            chosen = (variant, dict(params))
    if chosen is None:
        raise ValueError(f"adaptive schedule {schedule!r} has no entry for length {length}")
    return chosen


@register_kernel("adaptive")
def adaptive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
             causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
             fill: Optional[float] = None, schedule: Sequence = ()) -> torch.Tensor:
    """Run the variant the schedule assigns to this call's query length."""
    from codegen.ops import run

    variant, params = pick(schedule, q.shape[-2])
    if variant == "adaptive" or variant not in KERNELS:
        raise ValueError(f"adaptive schedule names {variant!r}, which has no kernel")
    return run(variant, q, k, v, mask, scale, causal, extra=extra, softcap=softcap, fill=fill, **params)
