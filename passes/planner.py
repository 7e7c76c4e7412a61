"""Choose a variant per site. Until the cost model prices candidates, dense is the only choice."""
from __future__ import annotations

import logging
from typing import Any, Optional, Union

from codegen import KERNELS
from passes.find import Match
from passes.variants import VARIANTS

logger = logging.getLogger(__name__)

# Every name the design reserves; those without a module yet are refused with a clear message.
CATALOGUE = (
    "dense", "sliding_window", "sinks_window", "neighborhood_2d", "block_sparse", "linear", "latent", "gqa_merge",
)

VariantSpec = Union[None, list, tuple, dict]


def normalise_variants(spec: VariantSpec) -> dict[str, Optional[dict]]:
    """Turn the user's ``variants=`` argument into {name: fixed params or None}, validating names."""
    if spec is None:
        return {name: None for name in VARIANTS if name in KERNELS}
    if isinstance(spec, str):
        spec = [spec]
    items: dict[str, Optional[dict]] = (
        {k: (dict(v) if v is not None else None) for k, v in spec.items()} if isinstance(spec, dict)
        else {name: None for name in spec}
    )
    for name in items:
        if name not in CATALOGUE:
            raise ValueError(f"unknown variant {name!r}; the catalogue is: {', '.join(CATALOGUE)}")
        if name not in VARIANTS or name not in KERNELS:
            have = "reference math but no kernel yet" if name in VARIANTS else "no implementation yet"
            raise ValueError(
                f"variant {name!r} is in the design catalogue but has {have}; "
                f"rewritable now: {', '.join(sorted(n for n in VARIANTS if n in KERNELS))}"
            )
    return items


def choose(m: Match, allowed: dict[str, Optional[dict]]) -> tuple[Optional[str], dict, str]:
    """(variant, params, reason) for one site; variant None means the site stays as it was."""
    if not m.site.rewritable:
        return None, {}, m.site.reason
    refusals = []
    for name, fixed in allowed.items():
        module = VARIANTS[name]
        why = module.applies(m.site)
        if why:
            refusals.append(f"{name}: {why}")
            continue
        params: dict[str, Any] = {**getattr(module, "DEFAULTS", {}), **(fixed or {})}
        reason = "exact; fused kernel" if name == "dense" else "forced" if fixed is not None else "cheapest in budget"
        return name, params, reason
    return None, {}, "; ".join(refusals) or "no allowed variant applies"
