"""``dense``: exact softmax attention; the baseline every other variant is measured against."""
from __future__ import annotations

from typing import Optional

from codegen.variants.dense import KERNEL
from passes.variants import Variant

DEFAULTS: dict = {}
PARAMS: dict = {}


def applies(site) -> Optional[str]:
    """Dense applies to every site; returns None (no reason to refuse)."""
    return None


def exact(site, params: dict) -> bool:
    """Dense is the original math: always exact."""
    return True


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: [])
