"""Shared helpers for the variants' candidate grids and applicability checks."""
from __future__ import annotations

from typing import Optional


def powers_below(n: int, lo: int = 16, hi: Optional[int] = None) -> list[int]:
    """Powers of two from ``lo`` up to (excluding) ``n`` (and at most ``hi``), ascending."""
    out, w = [], lo
    while w < n and (hi is None or w <= hi):
        out.append(w)
        w *= 2
    return out


def sequence_reason(site, cache: bool = False) -> Optional[str]:
    """Why a sequence-local pattern (window, sinks) cannot apply to ``site``, or None.

    With ``cache``, fewer queries than keys are read as the newest positions of a KV cache (query i at
    position M - P + i, a decode step), which is how the variant's kernel aligns them.
    """
    if site.is_cross:
        return "cross-attention has no sequence order between queries and keys"
    if site.q_len < 0 or site.kv_len < 0:
        return "its sequence lengths are not known"
    if cache and site.q_len < site.kv_len:
        return None
    if site.q_len != site.kv_len:
        return f"queries ({site.q_len}) and keys ({site.kv_len}) are not the same sequence"
    return None


def modifier_reason(site, softcap: bool = True, masks: tuple = ("none", "causal", "padding", "bool", "additive"),
                    fill: bool = False) -> Optional[str]:
    """Why a variant that supports the given modifiers cannot carry the site's, or None."""
    if getattr(site, "softcap", 0.0) and not softcap:
        return "the scores are soft-capped, which this variant's kernel does not apply"
    if site.mask_kind not in masks and not getattr(site, "window", None):
        return f"its kernel does not take a {site.mask_kind} mask"
    if getattr(site, "fill", None) is not None and not fill:
        return "the mask's finite fill value only matters to exact attention"
    return None


def windows(n: int, lo: int = 16) -> list[int]:
    """Window sizes worth trying at length ``n``: powers of two below it plus 1/2 and 3/4 of it (multiples of 16)."""
    frac = {max(lo, (n * f // 4) // 16 * 16) for f in (2, 3)}
    return sorted({w for w in set(powers_below(n, lo=lo)) | frac if lo <= w < n})


def with_delta(grid: list[dict], stride: int = 8) -> list[dict]:
    """Each choice as is and with a Delta-Attention correction (exact attention on every stride-th query)."""
    return grid + [{**g, "delta": stride} for g in grid]
