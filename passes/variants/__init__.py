"""The variant catalogue: one module per variant, each with its reference math and cascade."""
from __future__ import annotations

import importlib
from types import ModuleType

_NAMES = ("dense", "sliding_window", "sinks_window", "neighborhood_2d", "block_sparse", "linear", "latent", "gqa_merge")

VARIANTS: dict[str, ModuleType] = {n: importlib.import_module(f"passes.variants.{n}") for n in _NAMES}


def get_variant(name: str) -> ModuleType:
    """Return the module defining variant ``name`` or raise a ValueError listing the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known variants: {sorted(VARIANTS)}") from None
