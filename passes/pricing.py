"""Price a site's original attention and its candidates with the Einsum-cascade cost model."""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional

from codegen.hw_calibrate import auto_calibrate, ensure_calibrated, factor_key, predicted_key
from cost_model import hardware
from cost_model.hardware import profile_note  # noqa: F401  (the plan's note on its CPU figures)
from cost_model.predict import predict
from passes.site import AttentionSite
from passes.variants import exact_name, get_variant

logger = logging.getLogger(__name__)


#: what ``optimize(target=...)`` accepts: this CPU, the CUDA device present, or a GPU's datasheet profile by name
TARGETS = ("cpu", "cuda", "h100", "h200", "a100")


@functools.lru_cache(maxsize=None)
def profile(target: str, device_name: str = "") -> hardware.Hardware:
    """The hardware profile for a target: this CPU's calibration, a named GPU's or the CUDA device's datasheet.

    The CPU is calibrated on first use (a quick measurement, cached) unless ``ATTENTION_REWRITER_CALIBRATE=0``.
    """
    if target == "cpu":
        if auto_calibrate() and not hardware.cache_path().exists():
            logger.info("calibrating this CPU once (a few seconds; cached at %s)", hardware.cache_path())
            return ensure_calibrated()[0]
        return hardware.get("cpu")
    if target != "cuda":
        return hardware.get(target)
    name = device_name.upper()
    return hardware.get("h200" if "H200" in name else "a100" if "A100" in name else "h100")


def site_shape(site: AttentionSite, length: Optional[int] = None) -> Optional[dict[str, int]]:
    """The cost model's rank sizes for a site (at another sequence length if given), or None when symbolic."""
    p, m = site.q_len, site.kv_len
    if length is not None:
        p, m = (length, length) if p == m else (p, length)
    shape = {"B": site.batch, "H": site.num_heads, "G": site.num_kv_heads, "P": p,
             "M": m, "E": site.head_dim, "F": site.v_head_dim}
    return shape if all(isinstance(v, int) and v > 0 for v in shape.values()) else None


@functools.lru_cache(maxsize=8192)
def _seconds(cascade: str, shape: tuple, causal: bool, form: Optional[str], hw: hardware.Hardware,
             params: tuple) -> float:
    raw = predict(cascade, dict(shape), hw, causal=causal, form=form, **dict(params)).seconds
    return corrected(hw, cascade, form, raw)


def corrected(hw: hardware.Hardware, cascade: str, form: Optional[str], raw: float) -> float:
    """Seconds the kernel running ``cascade`` takes on this CPU where the cost model counts ``raw`` seconds.

    The calibration timed each kernel at a long and a short shape. Through those two points the time is
    ``fixed + slope * raw``: the slope is how well the kernel turns counted work into time, the fixed part
    what it spends per call whatever the work (block selection, the library calls around it, threading),
    which dominates at short lengths. Where the two points give no positive fixed part (the kernel is
    relatively slower on long inputs), the measured/predicted ratio is interpolated on the log of ``raw``
    instead; with one timing it is the long shape's ratio. Variants without their own timing
    borrow the nearest kernel's: sinks and neighbourhoods run the window's kernel; latent and merged heads
    run dense attention. Unmeasured (a GPU, generic figures): ``raw``.
    """
    extra = dict(hw.extra)
    for name in filter(None, (cascade, _timed_as(cascade))):
        key = factor_key(name, form)
        if key not in extra:
            continue
        ratio, t_long = float(extra[key]), extra.get(predicted_key(name, form))
        short = factor_key(name, form, short=True)
        t_short = extra.get(predicted_key(name, form, short=True))
        if short not in extra or not t_long or not t_short or t_long <= t_short:
            return ratio * raw
        m_long, m_short = ratio * t_long, float(extra[short]) * t_short
        slope = (m_long - m_short) / (t_long - t_short)
        fixed = m_short - slope * t_short
        if fixed > 0 and slope > 0:
            return fixed + slope * raw
        # relatively slower at the long shape (its operands spill out of the caches): the ratio moves
        # from the short shape's to the long one's with the log of the work, and stays there beyond
        x = min(1.0, max(0.0, math.log(raw / t_short) / math.log(t_long / t_short)))
        return raw * math.exp((1 - x) * math.log(float(extra[short])) + x * math.log(ratio))
    return raw


def _timed_as(cascade: str) -> Optional[str]:
    """The kernel whose calibrated timing a variant's shares when it has none of its own."""
    from codegen.registry import exact_variant, kernel_variant
    rec = kernel_variant(cascade)
    if rec is not None:
        return rec.timed_as
    return exact_variant().name if cascade == "gqa" else None  # the cost model's GQA form of exact attention


def _terms(site: AttentionSite, variant: str, params: dict, shape: dict) -> list[tuple[str, dict, dict, Optional[str]]]:
    """(cascade, its params, shape, form) terms whose times add up to the variant's time.

    A variant's record prices itself (``Variant.price``): by default its own cascade with the parameters
    the cascade takes, at the site's shape. A Delta correction adds exact attention for every stride-th query.
    """
    rec = get_variant(variant)
    p = {k: v for k, v in params.items() if k not in ("block", "delta")}
    stride = int(params.get("delta", 0) or 0)
    if stride > 1:
        return _terms(site, variant, p, shape) + [
            (exact_name(), {}, {**shape, "P": max(1, math.ceil(shape["P"] / stride))}, "online")]
    if rec.price is not None:
        return list(rec.price(site, p, shape))
    if rec.kernel.exact_always:
        return [(variant, {}, shape, "online")]
    keep = {k: v for k, v in p.items() if k in rec.kernel.cascade_params}
    return [(variant, keep, shape, None)]


def seconds(site: AttentionSite, variant: str, params: dict, hw: hardware.Hardware,
            length: Optional[int] = None) -> Optional[float]:
    """Predicted seconds of ``variant`` at the site (None if it cannot be priced)."""
    shape = site_shape(site, length)
    if shape is None:
        return None
    total = 0.0
    try:
        causal = site.causal and not get_variant(variant).never_causal
        for cascade, prm, shp, form in _terms(site, variant, params, shape):
            total += _seconds(cascade, tuple(sorted(shp.items())), causal, form, hw, tuple(sorted(prm.items())))
    except (KeyError, ValueError, TypeError) as e:
        logger.info("cannot price %s for %s: %s", variant, site.name, e)
        return None
    return total


def original_seconds(site: AttentionSite, hw: hardware.Hardware, length: Optional[int] = None) -> Optional[float]:
    """Predicted seconds of the site as written: SDPA is fused; matmul/softmax/matmul runs three passes."""
    shape = site_shape(site, length)
    if shape is None:
        return None
    form = "online" if site.spelling == "sdpa" else "3pass"
    try:
        base = _seconds(exact_name(), tuple(sorted(shape.items())), site.causal, form, hw, ())
    except (KeyError, ValueError, TypeError) as e:
        logger.info("cannot price %s: %s", site.name, e)
        return None
    return base + getattr(site, "score_ops", 0) * score_pass_seconds(shape, hw)


def score_pass_seconds(shape: dict, hw: hardware.Hardware) -> float:
    """Seconds of one separate element-wise library call over a whole score matrix (a scale, a mask add).

    Eager attention runs each as its own pass: it reads the scores and writes a fresh score-sized
    tensor, from the cache when that fits, else from and to main memory.
    """
    elems = shape["B"] * shape["H"] * shape["P"] * shape["M"]
    compute = elems / (hw.eager_other_per_s or hw.other_per_s)
    nbytes = elems * hw.dtype_bytes
    if 2 * nbytes <= hw.cache_bytes:
        return max(compute, 2 * nbytes / hw.cache_bytes_per_s) + hw.launch_s
    return max(compute, nbytes / hw.read_bytes_per_s + nbytes / hw.write_bytes_per_s) + hw.launch_s


def predicted_speedup(site: AttentionSite, variant: str, params: dict, hw: hardware.Hardware) -> Optional[float]:
    """Predicted time of the site as written over its time as ``variant`` (None if it cannot be priced)."""
    before, after = original_seconds(site, hw), seconds(site, variant, params, hw)
    if before is None or after is None or after <= 0:
        return None
    return before / after
