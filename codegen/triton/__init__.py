"""Generated Triton kernels for the attention variants (optional: everything works without Triton).

* ``run(variant, q, k, v, mask, scale, causal, **params)``: the generated kernel, no fallback
  (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); tests call it directly.
* ``maybe_run(...)``: what the registered kernels call on CUDA (and, for tests, on CPU tensors
  under the interpreter with ``REWRITER_TRITON=force``); ``None`` when Triton is absent,
  disabled (``REWRITER_TRITON=0``) or the kernel fails to generate, compile or launch (warned once),
  so the caller runs its reference/CPU path instead and the result is never wrong.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import torch

from codegen.triton import library  # noqa: F401  registers rewriter_triton::attention when Triton is installed
from codegen.triton.gen import generate, has_triton, load
from codegen.triton.launch import call_spec, interpreting, run

logger = logging.getLogger(__name__)

__all__ = ["available", "call_spec", "generate", "interpreting", "load", "maybe_run", "run"]

_WARNED: set[tuple[str, str]] = set()
_FAILED: set[str] = set()


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def enabled() -> bool:
    """Triton dispatch is on unless REWRITER_TRITON=0."""
    return os.environ.get("REWRITER_TRITON", "1") != "0"


def _wanted(q: torch.Tensor) -> bool:
    """CUDA tensors always; CPU tensors only under the interpreter with REWRITER_TRITON=force (tests)."""
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and interpreting() and os.environ.get("REWRITER_TRITON") == "force"


def maybe_run(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              scale: float, causal: bool, softcap: float = 0.0, fill: Optional[float] = None,
              params: Optional[Mapping[str, Any]] = None, extra: Sequence[torch.Tensor] = ()
              ) -> Optional[torch.Tensor]:
    """The generated kernel's output on CUDA, or ``None`` (caller falls back) when it cannot run."""
    if not has_triton(variant) or not enabled() or not _wanted(q) or not available():
        return None
    params = dict(params or {})
    key = variant
    try:
        key = call_spec(variant, q, k, v, mask, causal, softcap, params, extra=extra).hash
        if key in _FAILED:
            return None
        return run(variant, q, k, v, mask, scale, causal, softcap=softcap, fill=fill, extra=extra, **params)
    except Exception as exc:  # generation, compilation or launch: fall back, never return junk
        _FAILED.add(key)
        sig = (variant, type(exc).__name__)
        if sig not in _WARNED:
            _WARNED.add(sig)
            msg = f"Triton kernel for {variant} failed ({type(exc).__name__}: {exc}); using the reference path"
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return None
