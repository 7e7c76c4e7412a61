"""``torch.ops.rewriter_triton.attention``: the generated kernels as a ``torch.library.triton_op``.

With ``triton_op`` + ``wrap_triton``, ``torch.compile`` and ``torch.export`` see the Triton kernel
itself (not an opaque call), so Inductor can schedule around it.  Only the ``ranges`` family
without extra tensors is exposed (the variants whose kernel walks key spans): its host side is strides and a grid,
which trace; the block-map variants choose blocks with data-dependent sizes on the host.
Registered on import when Triton is installed; ``OP`` is ``None`` otherwise.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import torch

from codegen.registry import kernel_variants

logger = logging.getLogger(__name__)

OP = None


def traceable() -> tuple[str, ...]:
    """The variants this op runs: ranges-family kernels that read no extra tensors."""
    return tuple(n for n, r in kernel_variants().items()
                 if r.triton is not None and r.triton.family == "ranges" and not r.triton.low_rank)

try:
    import triton  # noqa: F401
    from torch.library import triton_op, wrap_triton
except Exception:  # no Triton (or a torch without triton_op): the op is simply not defined
    triton_op = wrap_triton = None

if triton_op is not None:

    @triton_op("rewriter_triton::attention", mutates_args={})
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                  causal: bool, variant: str, params: str, softcap: float = 0.0,
                  fill: Optional[float] = None) -> torch.Tensor:
        """Generated Triton attention (ranges-family variants) visible to torch.compile/export."""
        from codegen.triton.launch import prepare
        if variant not in traceable():
            raise ValueError(f"rewriter_triton::attention runs {traceable()}; {variant!r} is not traceable")
        job = prepare(variant, q, k, v, mask, scale, causal, softcap=softcap, fill=fill,
                      **json.loads(params or "{}"))
        wrap_triton(job.kernel)[job.grid](*job.args, **job.kwargs)
        return job.out

    OP = attention
