"""Kernel specs: one frozen record per (variant, parameters, dtypes, dims, mask form, block sizes).

A spec is what a generated kernel is specialised on; its ``hash`` names the kernel's source in
the cache and in exported artifacts.  Lengths (P, M) and batch sizes are *not* in the spec: the
key blocks a query block visits are derived from the parameters at run time (``codegen.pattern``),
so one kernel serves every length.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

MASK_KINDS = ("none", "padding", "bool", "additive")


def mask_kind(mask: Optional[torch.Tensor]) -> str:
    """Classify an op mask: none, padding (key-only broadcast), bool or additive (general)."""
    if mask is None:
        return "none"
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if shape[1] == 1 and shape[2] == 1:
        return "padding"
    return "bool" if mask.dtype == torch.bool else "additive"


def _canon(value: Any) -> Any:
    """JSON-stable form of a parameter value (tuples become lists, floats keep repr)."""
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canon(v) for k, v in sorted(value.items())}
    return value


@dataclass(frozen=True)
class KernelSpec:
    """Everything a generated kernel is specialised on (lengths and batch are runtime values)."""

    variant: str
    params: tuple[tuple[str, Any], ...] = ()
    dtype: str = "float32"
    head_dim: int = 64           # E, the q.k contraction
    value_dim: int = 64          # F
    gqa: int = 1                 # H // G query heads per K/V head
    causal: bool = False
    mask: str = "none"           # one of MASK_KINDS
    softcap: bool = False
    block_q: int = 64
    block_k: int = 64
    extra: tuple[str, ...] = field(default=())  # names of extra tensors the kernel reads

    def param(self, name: str, default: Any = None) -> Any:
        """The value of parameter ``name`` (or ``default``)."""
        return dict(self.params).get(name, default)

    def to_json(self) -> dict:
        """A JSON-serialisable dict of the spec (stable key order)."""
        return {
            "variant": self.variant, "params": {k: _canon(v) for k, v in self.params}, "dtype": self.dtype,
            "head_dim": self.head_dim, "value_dim": self.value_dim, "gqa": self.gqa, "causal": self.causal,
            "mask": self.mask, "softcap": self.softcap, "block_q": self.block_q, "block_k": self.block_k,
            "extra": list(self.extra),
        }

    @functools.cached_property  # specs are immutable; dispatch asks for the hash on every call
    def hash(self) -> str:
        """Short sha256 of the canonical JSON; names the kernel's generated source."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @staticmethod
    def make(variant: str, params: Optional[Mapping[str, Any]] = None, **fields: Any) -> "KernelSpec":
        """Build a spec with parameters given as a mapping (sorted into the frozen tuple)."""
        items = tuple(sorted((str(k), _freeze(v)) for k, v in (params or {}).items()))
        return KernelSpec(variant=variant, params=items, **fields)


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def spec_for_call(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: Optional[torch.Tensor], causal: bool, softcap: float, params: Mapping[str, Any],
                  block_q: int = 64, block_k: int = 64) -> KernelSpec:
    """The spec of one concrete kernel call (shapes give the dims; lengths are left out)."""
    return KernelSpec.make(
        variant, params, dtype=str(q.dtype).replace("torch.", ""), head_dim=int(q.shape[-1]),
        value_dim=int(v.shape[-1]), gqa=int(q.shape[1] // k.shape[1]), causal=bool(causal),
        mask=mask_kind(mask), softcap=softcap > 0, block_q=block_q, block_k=block_k)
