"""``strided_window``: a sliding window shared by groups of ``stride`` consecutive queries (GNA's stride).

The queries at absolute positions ``s·t .. s·t + s - 1`` form one group, and every query of a group sees
the keys of the window centred on the group's centre ``c = s·t + (s - 1) // 2``: key j is visible when
|c - j| < W (and j <= i if causal). One key interval per query, so the block map, the element test, the
naive mask and the Triton visibility code all come from the span below. With ``stride`` 1 it is
``sliding_window``; a stride of the query block makes every query block see one span, so key blocks are
whole more often (Generalized Neighborhood Attention).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.pattern import Bound, Span
from codegen.registry import KernelVariant, TritonKernel, register
from codegen.sparse import no_fill, reference_pattern, run_pattern
from codegen.variants import sliding_window

NAME = "strided_window"


def spans(*, window: int, stride: int, **_) -> list[Span]:
    """Keys [c - W + 1, c + W - 1] around the centre c of query i's group of ``stride``."""
    w, s = int(window), int(stride)
    if w < 1 or s < 1:
        raise ValueError(f"{NAME}: window and stride must be >= 1, not window={window}, stride={stride}")
    centre = (s - 1) // 2
    return [Span(Bound("query", centre - (w - 1), s), Bound("query", centre + w - 1, s), "strided window")]


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, window: int, stride: int, **_
              ) -> torch.Tensor:
    """Naive float64 attention with the strided window's element mask."""
    return reference_pattern(NAME, {"window": window, "stride": stride}, q, k, v, mask, scale, causal, softcap)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, window: int, stride: int, block: int = 64) -> torch.Tensor:
    """Strided-window attention visiting only the key blocks of each query block's windows."""
    no_fill(NAME, mask, fill)
    return run_pattern(NAME, {"window": int(window), "stride": int(stride)}, q, k, v, mask, scale, causal,
                       softcap, int(block))


def cascade(*, window: object = None, stride: object = 1, **kw):
    """Priced as the sliding window of the same width: each query sees as many keys."""
    return sliding_window.cascade(window=window, **kw)


KERNEL = register(KernelVariant(
    name=NAME, kernel=kernel, reference=reference, spans=spans, compiled_cpu=True,
    triton=TritonKernel("ranges", ("window", "stride"), narrow_key_tiles=True),
    timed_as=sliding_window.KERNEL.name, cascade=cascade,
    cascade_params={"window": int, "stride": int, "block": int},
    examples=lambda n: [{"window": 4, "stride": 3, "block": 8}, {"window": max(2, n // 3), "stride": 8},
                        {"window": 1, "stride": 2, "block": 16}],
    degenerate=lambda n, e: {"window": 2 * n, "stride": 4}))
