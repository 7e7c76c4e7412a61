"""``sinks_window``: the sliding window plus the first S keys for every query (StreamingLLM).

Spec: two key intervals per query, [0, S - 1] and [i - W + 1, i + W - 1] (causal clamps both).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.pattern import Bound, Span
from codegen.registry import KernelVariant, TritonKernel, register
from codegen.sparse import no_fill, reference_pattern, run_pattern
from codegen.variants import sliding_window
from cost_model import ir
from cost_model.cascades import local_span, size, softmax_form
from cost_model.ir import sym

NAME = "sinks_window"


def spans(*, window: int, sinks: int, **_) -> list[Span]:
    """The sinks, keys [0, S - 1] (none when S = 0), then the window."""
    if int(window) < 1 or int(sinks) < 0:
        raise ValueError(f"{NAME}: window must be >= 1 and sinks >= 0")
    sink = [Span(Bound("first", 0), Bound("first", int(sinks) - 1), "sinks")] if int(sinks) > 0 else []
    return sink + sliding_window.spans(window=window)


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, window: int, sinks: int, **_
              ) -> torch.Tensor:
    """Naive dense attention with the sinks-plus-window element mask."""
    return reference_pattern(NAME, {"window": window, "sinks": sinks}, q, k, v, mask, scale, causal, softcap)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, window: int, sinks: int, block: int = 64) -> torch.Tensor:
    """Sinks + sliding-window attention visiting only the sink and window key blocks."""
    no_fill(NAME, mask, fill)
    return run_pattern(NAME, {"window": int(window), "sinks": int(sinks)}, q, k, v, mask, scale, causal,
                       softcap, int(block))


def cascade(*, window: object = None, sinks: object = None, causal: bool = False, block: object = 64,
                 form: str | None = None, schedule: str = "fused", tile_q: object = 64,
                 tile_k: object = 64) -> ir.Cascade:
    """StreamingLLM sinks + window: the first S keys plus the sliding window."""
    w = size(window) if window is not None else sym("W")
    s = size(sinks) if sinks is not None else sym("S")
    form = softmax_form(form, schedule)
    return local_span(NAME, causal=causal, window=w, sinks=s, block=size(block), form=form,
                  schedule=schedule, tile_k=tile_k, gather=schedule == "eager",
                  params={"window": w, "sinks": s, "block": block},
                  notes="sinks + window span per query block" + (", causal" if causal else ""))


KERNEL = register(KernelVariant(
    name=NAME, kernel=kernel, reference=reference, spans=spans, compiled_cpu=True,
    triton=TritonKernel("ranges", ("window", "sinks"), narrow_key_tiles=True),
    timed_as=sliding_window.KERNEL.name, cascade=cascade,
    cascade_params={"window": int, "sinks": int, "block": int},
    examples=lambda n: [{"window": 3, "sinks": 2, "block": 8}, {"window": n // 4 + 1, "sinks": 0}],
    degenerate=lambda n, e: {"window": n, "sinks": 1}))
