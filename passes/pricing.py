"""Price a site's original attention and its rewrite with the Einsum-cascade cost model."""
from __future__ import annotations

import functools
import logging
from typing import Optional

from cost_model import hardware
from cost_model.predict import predict
from passes.site import AttentionSite
from passes.variants import get_variant

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def profile(target: str, device_name: str = "") -> hardware.Hardware:
    """The hardware profile for a target: this CPU's calibration, or the GPU's datasheet figures."""
    if target == "cpu":
        return hardware.get("cpu")
    name = device_name.upper()
    return hardware.get("h200" if "H200" in name else "a100" if "A100" in name else "h100")


def site_shape(site: AttentionSite) -> Optional[dict[str, int]]:
    """The cost model's rank sizes for a site, or None when a size is symbolic."""
    shape = {"B": site.batch, "H": site.num_heads, "G": site.num_kv_heads, "P": site.q_len,
             "M": site.kv_len, "E": site.head_dim, "F": site.v_head_dim}
    return shape if all(v > 0 for v in shape.values()) else None


@functools.lru_cache(maxsize=4096)
def _seconds(cascade: str, shape: tuple, causal: bool, form: Optional[str], hw: hardware.Hardware,
             params: tuple) -> float:
    return predict(cascade, dict(shape), hw, causal=causal, form=form, **dict(params)).seconds


def predicted_speedup(site: AttentionSite, variant: str, params: dict, hw: hardware.Hardware) -> Optional[float]:
    """Predicted time of the site as written over its time as ``variant`` (None if it cannot be priced)."""
    shape = site_shape(site)
    if shape is None:
        return None
    key = tuple(sorted(shape.items()))
    # Written out as matmul/softmax/matmul, attention runs the naive three passes; SDPA is fused.
    original_form = "online" if site.spelling == "sdpa" else "3pass"
    cascade = getattr(get_variant(variant), "CASCADE", variant)
    try:
        before = _seconds("dense", key, site.causal, original_form, hw, ())
        after = _seconds(cascade, key, site.causal, "online" if cascade == "dense" else None, hw,
                         tuple(sorted((k, v) for k, v in params.items() if k != "block")))
    except (KeyError, ValueError, TypeError) as e:
        logger.info("cannot price %s for %s: %s", variant, site.name, e)
        return None
    return before / after if after > 0 else None
