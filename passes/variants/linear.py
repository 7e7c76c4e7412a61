"""``linear``: kernelised attention phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1), phi = elu + 1.

Non-causal: one phi(K)^T V state per KV head, then a matmul per query.  Causal: chunked as in
flash-linear-attention with chunk C: exact (phi(Q_c) phi(K_c)^T masked lower-triangular) inside
a chunk, plus phi(Q_c) times the state carried from all earlier chunks.  Queries sit at the
end of the keys (query i at position M - P + i); keys before the first query enter the state.
``scale`` is accepted for a uniform signature; the feature map is applied to raw q and k.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

from codegen.variants import sliding_window
from codegen.variants.linear import KERNEL
from codegen.variants.linear import PROBE as KERNEL_PROBE
from passes.variants import Variant
from passes.variants._grid import modifier_reason, powers_below

logger = logging.getLogger(__name__)

DEFAULTS: dict = {"chunk": 64, "feature_map": "elu1", "window": 0}
PARAMS: dict = {"feature_map": str, "window": int, "chunk": int}
FEATURE_MAPS = ("elu1", "taylor", "hedgehog")


def applies(site) -> Optional[str]:
    """Linear attention needs keys that are only padded or causally hidden; returns a reason if not."""
    if site.q_len < 0 or site.kv_len < 0:
        return "the lengths are not known"
    if site.q_len > site.kv_len:
        return "more queries than keys"
    if site.window is not None:
        return "the site's own band mask is not a key-padding mask, the only mask the linear kernel takes"
    return modifier_reason(site, softcap=False, masks=("none", "causal", "padding"))


def grid(site) -> list[dict]:
    """Feature maps to try: Taylor or a learned (Hedgehog) map with a softmax window, and plain elu+1."""
    out: list[dict] = []
    for w in powers_below(site.kv_len, lo=32, hi=256):
        if site.head_dim <= 64:  # the Taylor map has 1 + d + d² features
            out.append({"feature_map": "taylor", "window": w, "chunk": 64})
    # A learned map is fitted to the normalised attention weights, which is the kernel's pure linear form;
    # combined with a softmax window its features (at most 2 in φ(q)·φ(k)) cannot match exp(s) in scale.
    out.append({"feature_map": "hedgehog", "window": 0, "chunk": 64})
    out.append({"feature_map": "elu1", "window": 0, "chunk": 64})
    return out


def feature_dim(site, params: dict) -> int:
    """Width of the feature map the variant prices: φ(q)·φ(k) runs over this many features."""
    fm = params.get("feature_map", "elu1")
    d = site.head_dim
    if fm == "taylor":
        return 1 + d + d * d
    if fm == "hedgehog":
        return 2 * d
    return d


def exact(site, params: dict) -> bool:
    """True when the softmax window covers every key."""
    return int(params.get("window", 0)) >= max(site.q_len, site.kv_len)

def check_params(params: dict) -> None:
    """Raise a ValueError for parameter values the kernel cannot run."""
    if params.get("feature_map", "elu1") not in FEATURE_MAPS:
        raise ValueError(f"linear: feature_map must be one of {', '.join(FEATURE_MAPS)}, not {params['feature_map']!r}")
    if params.get("chunk", 1) < 1 or params.get("window", 0) < 0:
        raise ValueError("linear: chunk must be >= 1 and window >= 0")


def price(site, params: dict, shape: dict) -> list:
    """The kernelised pass over the feature map's width, plus the softmax window when there is one."""
    terms = [(KERNEL.name, {"chunk": int(params.get("chunk", 64))}, {**shape, "E": feature_dim(site, params)}, None)]
    if int(params.get("window", 0)) > 0:
        terms.append((sliding_window.KERNEL.name, {"window": int(params["window"])}, shape, None))
    return terms


def prepare(sp, cands: list, records: list, index: int, say) -> None:
    """Learned feature maps: fitted once per site (on first use), shared by every window size."""
    from codegen import lowrank
    from passes.fitting import fit_hedgehog

    cands = [c for c in cands if c.params.get("feature_map") == "hedgehog"]
    if not cands or not records:
        return
    refusal = _linear_mask_refusal(records)
    if refusal:  # the kernel would refuse every fitted map: do not spend the fitting time
        for c in cands:
            c.error, c.failure = math.inf, refusal
        logger.info("site %s: hedgehog not fitted: %s", sp.site.name, refusal)
        return
    key = f"site{index}-hedgehog-{id(sp)}"
    cache: list = []

    def prepare(c) -> None:
        if not cache:
            t0 = time.perf_counter()
            cache.append(fit_hedgehog(records, desc=f"fitting feature maps, site {index}"))
            say(f"site {index} {sp.site.name}: fitted Hedgehog feature maps in {time.perf_counter() - t0:.1f}s")
            lowrank.PROBES[key] = tuple(cache[0])
        c.extra = tuple(cache[0])
        c.probe = (KERNEL_PROBE, {"probe": key, "inner": KERNEL.name, **c.params})

    for c in cands:
        c.prepare = prepare


def _linear_mask_refusal(records: list) -> str:
    """Why the linear kernel would refuse these records' masks ('' when it takes them all)."""
    from codegen.variants.linear import key_keep

    for r in records:
        try:
            key_keep(r.mask, r.q.shape[0], r.k.shape[2])
        except ValueError as e:
            return f"ValueError: {e}"
    return ""


VARIANT = Variant(
    name=KERNEL.name, kernel=KERNEL, applies=applies, exact=exact, grid=lambda site, facts=None: grid(site),
    defaults=DEFAULTS, params=PARAMS, check=check_params,
    price=price, prepare=prepare)
