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


def _exact(variant: str) -> bool:
    """Whether ``variant``'s kernel is the original math (no correction applies on top of it)."""
    from codegen.registry import kernel_variant
    rec = kernel_variant(variant)
    return rec is not None and rec.exact_always


_RECORD = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
    """Record every kernel call made in this thread (its inputs, output and variant), in call order.

    For looking at what ran (tests, debugging); calibration keys its records by op node instead
    (``passes.calibrate.record_sites``).
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
    if delta > 1 and not _exact(variant):
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
    from codegen.registry import kernel_variant
    rec = kernel_variant(variant)
    f = rec.output_dim(v, extra) if rec is not None and rec.output_dim is not None else v.shape[-1]
    return q.new_empty((*q.shape[:-1], f))


# Discover the variants' kernels after the op exists, so each module can register itself.
from codegen.registry import kernel_variants  # noqa: E402

kernel_variants()
from codegen import adaptive as _adaptive  # noqa: E402,F401
from codegen import lowrank as _lowrank  # noqa: E402,F401
