"""The kernel side of every variant: one ``KernelVariant`` record per variant, found by discovery.

Each module in ``codegen/variants/`` declares what its variant's kernels compute and registers its
record with ``register``. Every table that used to list variant names (the modifiers each kernel
honours, the Triton family and spec parameters, which kernels an artifact carries as sources, what
calibration times) is read from these records, so adding a variant means adding its module.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from codegen.pattern import Span


@dataclass(frozen=True)
class TritonKernel:
    """How a variant's generated Triton kernel is specialised.

    ``family`` picks the kernel's loop: ``ranges`` walks the key intervals of ``spans`` (or every key),
    ``blockmap`` visits the key blocks of a block map built per call, ``recurrent`` is the chunked
    linear-attention kernel. ``params`` are the parameters its spec keeps; ``spec_params`` normalises them
    (defaults, int lists); the default keeps ``params`` as given. ``visible`` overrides the element test
    derived from the spans with Triton
    lines ending in ``vis = ...``. ``available`` says whether a generated kernel exists for given
    parameters (a feature map the generator does not fuse runs the PyTorch path).
    """

    family: str
    params: tuple[str, ...] = ()
    spec_params: Optional[Callable[[dict], dict]] = None
    visible: Optional[Callable[[Any], list[str]]] = None
    available: Callable[[Mapping[str, Any]], bool] = lambda params: True
    block_map: Optional[Callable[..., Any]] = None  # (params, q, k, causal, mask, scale) -> BlockMap, per call
    low_rank: bool = False  # k and v arrive at rank R, with their up-projections as the extra tensors
    narrow_key_tiles: bool = False  # a band wastes less of a narrow key tile: autotune only those


@dataclass(frozen=True)
class KernelVariant:
    """What one variant's kernels compute and how they are run, priced and carried.

    * ``kernel``: the CPU/CUDA kernel under the op's contract (``codegen.ops``).
    * ``reference``: the naive float64 reference every kernel and probe is tested against (same contract).
    * ``spans``: the key intervals query i may see, from the parameters (``codegen.pattern.Span``); the
      block map, the element test, the naive mask and the Triton visibility code all derive from it.
    * ``supports``: op modifiers the kernel honours (softcap, fill, mask, padding_mask, gqa).
    * ``exact_always``: the variant is the original math (the baseline every other is measured against).
    * ``top_left``: queries align top-left (query i at position i) rather than at the end of the keys.
    * ``compiled_cpu``: the CPU lowering is the compiled block-sparse kernel (an artifact carries its source).
    * ``surgery_params``: parameters weight surgery consumes; the kernel only sees their effect.
    * ``output_dim``: the output's last dim from (v, extra) when it is not v's (up-projected values).
    * ``timing``: parameters calibration times the kernel with at n tokens (None: not timed on its own).
    * ``timed_as``: the variant whose calibrated timing this one's kernel shares when it has none.
    * ``cascade``: ``(causal, **params) -> Cascade`` built from cost_model's IR; ``cascade_params`` its typed
      parameters.
    * ``examples(n)``: parameter choices the conformance tests run at n keys; ``degenerate(n, e)``: parameters
      at which the variant is exact dense attention (n keys, head dim e).
    * ``probes``: planning-only kernels by name (the variant's math on an unchanged graph, before any weight
      surgery), registered under the op with the record and never written into an exported program.
    * ``operands(k, v, params, generator)``: (k, v, extra) as the kernel takes them, from full K/V (a variant
      reading low-rank K/V with its up-projections); None: k, v as they are, no extra tensors.
    """

    name: str
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    spans: Optional[Callable[..., Sequence[Span]]] = None
    supports: frozenset[str] = frozenset({"softcap", "mask", "gqa"})
    exact_always: bool = False
    top_left: bool = False
    compiled_cpu: bool = False
    triton: Optional[TritonKernel] = None
    surgery_params: tuple[str, ...] = ()
    output_dim: Optional[Callable[[torch.Tensor, Sequence[torch.Tensor]], int]] = None
    timing: Optional[Callable[[int], dict]] = None
    timed_as: Optional[str] = None
    cascade: Optional[Callable[..., Any]] = None
    cascade_params: Mapping[str, type] = field(default_factory=dict)
    examples: Callable[[int], list[dict]] = lambda n: [{}]
    degenerate: Optional[Callable[[int, int], dict]] = lambda n, e: {}
    operands: Optional[Callable[..., tuple]] = None
    probes: Mapping[str, Callable[..., torch.Tensor]] = field(default_factory=dict)


_REGISTRY: dict[str, KernelVariant] = {}


def register(record: KernelVariant) -> KernelVariant:
    """Register a variant's kernel record (and its kernel under the op); returns it."""
    from codegen.ops import KERNELS  # the op looks kernels up by name at run time
    _REGISTRY[record.name] = record
    KERNELS[record.name] = record.kernel
    for name, kernel in record.probes.items():
        if name in KERNELS and KERNELS[name] is not kernel:
            raise ValueError(f"{record.name}: probe kernel {name!r} is already registered by another variant")
        KERNELS[name] = kernel
    if record.cascade is not None:
        from cost_model import cascades
        cascades.register(record.name, record.cascade, record.cascade_params)
    if record.spans is not None:
        from codegen.pattern import PATTERNS, spans_pattern
        PATTERNS.setdefault(record.name, spans_pattern(record.spans))
    return record


@functools.lru_cache(maxsize=1)
def _discover() -> None:
    import codegen.variants as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def kernel_variants() -> dict[str, KernelVariant]:
    """Every registered variant's kernel record, by name (discovering ``codegen/variants/`` once)."""
    _discover()
    return dict(_REGISTRY)


def kernel_variant(name: str) -> Optional[KernelVariant]:
    """The kernel record of variant ``name`` (None when no module registers it)."""
    _discover()
    return _REGISTRY.get(name)


def exact_variant() -> KernelVariant:
    """The baseline: the one variant whose kernel is the original math."""
    found = [r for r in kernel_variants().values() if r.exact_always]
    if len(found) != 1:
        raise RuntimeError(f"exactly one variant must declare exact_always; found {[r.name for r in found]}")
    return found[0]
