"""The one custom op a rewritten attention site calls: ``torch.ops.rewriter.attention``.

The op carries the variant name and its parameters (JSON) so an exported graph keeps the
plan; the kernel for each variant is looked up at run time from ``KERNELS``.

Contract every kernel implements (``run`` below is the op without the dispatcher)::

    kernel(q, k, v, mask, scale, causal, *, extra, softcap, fill, **params) -> [B, H, P, F]

* q [B,H,P,E], k [B,G,M,E], v [B,G,M,F] with H % G == 0 (GQA/MQA: K/V heads are never repeated).
* scores s = scale * q.kᵀ; with ``softcap`` > 0, s = softcap * tanh(s / softcap).
* ``mask`` broadcasts to [B,H,P,M]: bool (True = attend) or float (added to s: padding,
  ALiBi, relative position bias, ...).
* ``causal`` is top-left aligned: key j is visible to query i when j <= i.
* A position the bool mask hides scores -inf, or ``fill`` when given (the finite value a model's
  ``masked_fill`` used, in the units of s): then a row with every key hidden averages its values
  exactly as the original did.  Causally hidden keys are always -inf.
* ``extra``: tensors a variant needs (latent up-projections, learned feature maps); [] otherwise.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Callable, Iterator, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

Kernel = Callable[..., torch.Tensor]
KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str) -> Callable[[Kernel], Kernel]:
    """Register ``fn`` as the kernel that runs variant ``name``."""

    def deco(fn: Kernel) -> Kernel:
        KERNELS[name] = fn
        return fn

    return deco


_RECORD = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
    """Record every kernel call made in this thread (its inputs, output and variant), in call order.

    Calibration runs a graph whose sites are all rewritten to exact ``dense`` inside this context:
    the i-th record is the i-th op call, which is the i-th op node in graph order.
    """
    calls: list[dict] = []
    prev = getattr(_RECORD, "calls", None)
    _RECORD.calls = calls
    try:
        yield calls
    finally:
        _RECORD.calls = prev


def run(
    variant: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    *,
    extra: Sequence[torch.Tensor] = (),
    softcap: float = 0.0,
    fill: Optional[float] = None,
    **params,
) -> torch.Tensor:
    """Run variant ``variant``'s kernel directly (what the op does, without the custom-op wrapper)."""
    try:
        kernel = KERNELS[variant]
    except KeyError:
        raise ValueError(
            f"rewriter::attention has no kernel for variant {variant!r}; known: {sorted(KERNELS)}. "
            "Import the package that defines it (import rewriter) before running the graph."
        ) from None
    if scale is None:
        scale = q.shape[-1] ** -0.5
    delta = int(params.pop("delta", 0) or 0)
    out = kernel(q, k, v, mask, float(scale), bool(causal), extra=list(extra), softcap=float(softcap),
                 fill=fill, **params).contiguous()
    if delta > 1 and variant != "dense":
        from codegen.corrections import delta_correct

        out = delta_correct(out, q, k, v, mask, float(scale), bool(causal), delta, softcap=float(softcap))
    # The op's contract is a contiguous [B,H,P,F] result: the fake kernel promises it to compilers.
    calls = getattr(_RECORD, "calls", None)
    if calls is not None:
        calls.append({"variant": variant, "q": q, "k": k, "v": v, "mask": mask, "scale": float(scale),
                      "causal": bool(causal), "extra": list(extra), "softcap": float(softcap), "fill": fill,
                      "params": params, "out": out})
    return out


@torch.library.custom_op("rewriter::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    variant: str,
    params: str,
    extra: Sequence[torch.Tensor],
    softcap: float = 0.0,
    fill: Optional[float] = None,
) -> torch.Tensor:
    """Attention over q [B,H,P,E], k [B,G,M,E], v [B,G,M,F] -> [B,H,P,F] by ``variant`` (see module doc)."""
    return run(variant, q, k, v, mask, scale, causal, extra=extra, softcap=softcap, fill=fill,
               **json.loads(params or "{}"))


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, causal, variant, params, extra, softcap=0.0, fill=None):
    f = v.shape[-1]
    if variant == "latent" and len(extra) == 2:  # values are low rank; the output is up-projected to F
        f = extra[1].shape[-1]
    return q.new_empty((*q.shape[:-1], f))


# Import kernels after the op exists so each module can register itself.
from codegen import dense as _dense  # noqa: E402,F401
from codegen import sliding_window as _sliding_window  # noqa: E402,F401
from codegen import sinks_window as _sinks_window  # noqa: E402,F401
from codegen import block_sparse as _block_sparse  # noqa: E402,F401
from codegen import neighborhood_2d as _neighborhood_2d  # noqa: E402,F401
from codegen import linear as _linear  # noqa: E402,F401
from codegen import latent as _latent  # noqa: E402,F401
from codegen import adaptive as _adaptive  # noqa: E402,F401
from codegen import lowrank as _lowrank  # noqa: E402,F401
