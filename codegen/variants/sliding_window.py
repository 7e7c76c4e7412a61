"""``sliding_window``: key j visible to query i when |i - j| < W (and j <= i if causal).

Spec: one key interval per query, [i - W + 1, i + W - 1]; queries sit at the end of the keys.
"""
from __future__ import annotations

from typing import Optional, Sequence

import sympy
import torch

from codegen.pattern import Bound, Span
from codegen.registry import KernelVariant, TritonKernel, register
from codegen.sparse import no_fill, reference_pattern, run_pattern
from cost_model import ir
from cost_model.cascades import local_span, size, softmax_form
from cost_model.ir import sym

NAME = "sliding_window"


def spans(*, window: int, **_) -> list[Span]:
    """The window: keys [i - W + 1, i + W - 1]."""
    w = int(window)
    if w < 1:
        raise ValueError(f"{NAME}: window must be >= 1")
    return [Span(Bound("query", -(w - 1)), Bound("query", w - 1), "window")]


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, window: int, **_) -> torch.Tensor:
    """Naive dense attention with the window's element mask."""
    return reference_pattern(NAME, {"window": window}, q, k, v, mask, scale, causal, softcap)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, window: int, block: int = 64) -> torch.Tensor:
    """Sliding-window attention visiting only the key blocks within the window."""
    no_fill(NAME, mask, fill)
    return run_pattern(NAME, {"window": int(window)}, q, k, v, mask, scale, causal, softcap, int(block))


def cascade(*, window: object = None, causal: bool = False, block: object = 64, form: str | None = None,
                   schedule: str = "fused", tile_q: object = 64, tile_k: object = 64) -> ir.Cascade:
    """Sliding window |i-j| < W (and j <= i if causal), computed by query blocks of ``block`` rows."""
    w = size(window) if window is not None else sym("W")
    form = softmax_form(form, schedule)
    # eagerly, a matmul on the overlapping strided spans copies them first (a gather)
    return local_span(NAME, causal=causal, window=w, sinks=sympy.Integer(0), block=size(block), form=form,
                  schedule=schedule, tile_k=tile_k, gather=schedule == "eager", params={"window": w, "block": block},
                  notes="window span per query block" + (", causal" if causal else ""))


KERNEL = register(KernelVariant(
    name=NAME, kernel=kernel, reference=reference, spans=spans,
    compiled_cpu=True, triton=TritonKernel("ranges", ("window",), narrow_key_tiles=True),
    timing=lambda n: {"window": n // 8}, cascade=cascade,
    cascade_params={"window": int, "block": int},
    examples=lambda n: [{"window": 1}, {"window": max(1, n // 3), "block": 16}, {"window": 5, "block": 8}],
    degenerate=lambda n, e: {"window": n}))
