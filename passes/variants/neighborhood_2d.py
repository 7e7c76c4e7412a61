"""``neighborhood_2d``: each image token attends to the kh x kw tokens around it (NATTEN); global tokens see all.

Applies to self-attention over a token grid found from the patch embedding (passes/grid.py); the
class and register tokens stay global (they attend to every token and every token attends to
them). The kernel is ``codegen.variants.neighborhood_2d``.
"""
from __future__ import annotations

from typing import Optional

from codegen.variants import sliding_window
from codegen.variants.neighborhood_2d import KERNEL, window_keys
from passes.variants import Variant
from passes.variants._grid import modifier_reason, sequence_reason, with_delta

DEFAULTS: dict = {"kernel": [7, 7]}
PARAMS: dict = {"grid": list, "kernel": list, "prefix": int, "delta": int}


def applies(site) -> Optional[str]:
    """Neighbourhood attention needs bidirectional self-attention (the grid itself is checked by the planner)."""
    if site.causal:
        return "the site is causal; neighbourhoods of an image grid are bidirectional"
    return sequence_reason(site) or modifier_reason(site, masks=("none", "padding", "additive"))


def grid(site, facts: Optional[dict] = None) -> list[dict]:
    """Odd square neighbourhoods smaller than the grid, smallest first, each also with a Delta correction."""
    g = (facts or {}).get("grid")
    if g is None:
        return []
    out = []
    for k in (3, 5, 7, 9, 13):
        if k < max(g.rows, g.cols):
            out.append({"grid": [g.rows, g.cols], "kernel": [min(k, g.rows), min(k, g.cols)], "prefix": g.prefix})
    return with_delta(out)


def exact(site, params: dict) -> bool:
    """True when the neighbourhood covers the whole grid."""
    rows, cols = params.get("grid", (0, 0))
    kh, kw = params.get("kernel", (0, 0))
    return kh >= rows and kw >= cols


def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    k = params.get("kernel", [1, 1])
    if len(k) != 2 or any((not isinstance(x, int)) or x < 1 or x % 2 == 0 for x in k):
        raise ValueError(f"neighborhood_2d: kernel must be two odd sizes >= 1, not {k!r}")
    if "grid" in params and (len(params["grid"]) != 2 or any(x < 1 for x in params["grid"])):
        raise ValueError(f"neighborhood_2d: grid must be [rows, cols], not {params['grid']!r}")


def complete(params: dict, facts: Optional[dict] = None) -> dict:
    """Fill the grid and the global-token count from the site's token grid when the user gave only a kernel."""
    g = (facts or {}).get("grid")
    if g is None:
        return params
    return {"grid": [g.rows, g.cols], "prefix": g.prefix, **params}


def price(site, params: dict, shape: dict) -> list:
    """A grid query visits kh*kw keys: priced as the 1-D bidirectional window that visits as many."""
    return [(sliding_window.KERNEL.name, {"window": window_keys(**params)}, shape, None)]


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=grid, defaults=DEFAULTS, params=PARAMS,
    check=check_params, complete=complete,
    needs=frozenset({"grid"}), price=price, never_causal=True)
