"""The variant catalogue: one ``Variant`` record per variant, each declared in its own module here.

A module in this package declares ``VARIANT = Variant(...)``: when the variant applies to a site,
the planner's parameter grid, when a choice is exact, and optional hooks, with the kernel side
(``codegen.registry.KernelVariant``) beside it. The catalogue is found by discovery: there is no
list of names anywhere, so a new variant is its two modules (``codegen/variants/<name>.py`` and
``passes/variants/<name>.py``) and its tests.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from codegen.registry import KernelVariant


def _no_check(params: dict) -> None:
    return None


def _as_given(params: dict, facts: Optional[dict] = None) -> dict:
    return params


@dataclass(frozen=True)
class Variant:
    """Everything the planner knows of one variant; the kernel side is ``kernel``.

    * ``applies(site)``: None, or why the variant cannot run at the site.
    * ``grid(site, facts)``: the parameter choices the planner tries (``facts``: what the graph showed,
      such as an image grid); ``defaults`` fill what a choice leaves out.
    * ``exact(site, params)``: the choice reproduces the site exactly.
    * ``params``: what a user may pass, with types (the kernel's, plus corrections such as ``delta``);
      ``check(params)`` raises a ValueError naming a value the kernel cannot run; ``fits(site, params)`` says
      why a choice the caller forced cannot run at this site (None: it can), which becomes that error.
    * ``complete(params, facts)``: fills what a forced choice leaves to the graph (the grid's size).
    * ``needs``: graph facts the planner must establish first (``grid``: an image token grid;
      ``factored_kv``: K and V from Linear projections it can rewrite).
    * ``weight_surgery``: the kind of weight change the plan makes for this variant (``low_rank``: K/V
      projections factored; ``merge_heads``: K/V heads averaged in groups; None: none). A site whose
      weights changed cannot switch back to the original by length (``changes_weights``).
    * ``prepare(site_plan, candidates, records, index, say)``: fits what this variant's candidates need on
      the site's calibration records (factors, merged heads, feature maps) before they are scored.
    * ``kv_heads(site, params)``: the K/V heads the kernel sees after surgery (None: the site's own).
    * ``price(site, params, shape)``: the (cascade, its params, shape, form) terms whose times add up to the
      variant's (default: its own cascade); ``never_causal``: it is priced as bidirectional attention.
    * ``standalone(site, params, generator)``: (K/V heads, K dim, V dim, extra tensors) of random operands the
      kernel takes on its own after the variant's surgery (for reports that time kernels standalone).
    * ``rotary_keys``: the variant also takes keys rotated after their projection (``k·cos + rotate(k)·sin``,
      found by ``passes.rotary``): the op gets the model's cos and sin and applies the rotation itself; the
      graph fact ``rope`` (the rotation's layout) reaches ``grid`` and ``complete``.
    * ``draws_band(params)``: the band |i - j| < W the choice applies by itself (None: none), so a site
      whose own mask is that band passes the op everything but the band.
    """

    name: str
    kernel: KernelVariant
    applies: Callable[[Any], Optional[str]]
    exact: Callable[[Any, dict], bool]
    grid: Callable[..., list[dict]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, type] = field(default_factory=dict)
    check: Callable[[dict], None] = _no_check
    fits: Optional[Callable[[Any, dict], Optional[str]]] = None
    complete: Callable[..., dict] = _as_given
    needs: frozenset[str] = frozenset()
    weight_surgery: Optional[str] = None
    prepare: Optional[Callable[..., None]] = None
    kv_heads: Optional[Callable[[Any, dict], int]] = None
    draws_band: Optional[Callable[[dict], Optional[int]]] = None
    price: Optional[Callable[[Any, dict, dict], list]] = None
    never_causal: bool = False
    standalone: Optional[Callable[[Any, dict, Any], tuple]] = None
    rotary_keys: bool = False

    @property
    def changes_weights(self) -> bool:
        """Whether the plan rewrites the model's weights for this variant."""
        return self.weight_surgery is not None


@functools.lru_cache(maxsize=1)
def _discover() -> dict[str, Variant]:
    found: dict[str, Variant] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        rec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "VARIANT", None)
        if isinstance(rec, Variant):
            found[rec.name] = rec
    # the exact baseline first, so every listing starts from what the others are measured against
    return dict(sorted(found.items(), key=lambda kv: (not kv[1].kernel.exact_always, kv[0])))


def variants() -> dict[str, Variant]:
    """Every registered variant, by name (the exact baseline first)."""
    return dict(_discover())


def get_variant(name: str) -> Variant:
    """The record of variant ``name``, or a ValueError listing the known ones."""
    try:
        return _discover()[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known variants: {sorted(_discover())}") from None


def exact_name() -> str:
    """The name of the exact baseline (the variant every site can fall back to)."""
    from codegen.registry import exact_variant
    return exact_variant().name


class _Catalogue(Mapping):
    """``VARIANTS``: a read-only view of the registry that discovers it on first use."""

    def __getitem__(self, name: str) -> Variant:
        return _discover()[name]

    def __iter__(self):
        return iter(_discover())

    def __len__(self) -> int:
        return len(_discover())


VARIANTS: Mapping[str, Variant] = _Catalogue()
