"""``gqa_merge``: exact attention over merged K/V heads (the kernel is ``dense``'s; see codegen/dense.py).

After the planner's weight surgery K and V simply have fewer heads than Q, so the naive reference is
dense attention with each KV head serving its group of query heads.
"""
from __future__ import annotations

from codegen.dense import reference as _dense_reference


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, fill=None, **_):
    """Dense attention in float32 over un-repeated (merged) K/V heads."""
    return _dense_reference(q, k, v, mask, scale, causal, softcap=softcap, fill=fill)
