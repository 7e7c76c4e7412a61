"""``gqa_merge``: exact attention over merged K/V heads.

After the planner's weight surgery K and V simply have fewer heads than Q, so the kernel is the dense
one and the naive reference is dense attention with each KV head serving its group of query heads.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.pattern import EVERY_KEY
from codegen.registry import KernelVariant, TritonKernel, register
from codegen.variants import dense as _dense
from cost_model import ir
from cost_model.cascades import dense, size
from cost_model.ir import sym

NAME = "gqa_merge"


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, fill=None, **_):
    """Dense attention in float32 over un-repeated (merged) K/V heads."""
    return _dense.reference(q, k, v, mask, scale, causal, softcap=softcap, fill=fill)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None) -> torch.Tensor:
    """Exact attention over merged K/V heads: after weight surgery it is the dense kernel."""
    return _dense.dense(q, k, v, mask, scale, causal, extra=extra, softcap=softcap, fill=fill)


def cascade(*, groups: object = None, **kw: object) -> ir.Cascade:
    """KV-head merging (MHA -> GQA): dense attention with ``groups`` KV heads instead of G."""
    kw.setdefault("name", NAME)
    c = dense(**kw)  # type: ignore[arg-type]
    gm = size(groups) if groups is not None else sym("Gm")
    sizes = tuple((r, s.subs(ir.G, gm)) for r, s in c.sizes)
    return c.replace(sizes=sizes, params=(("groups", gm),), notes=c.notes + ", merged KV heads")


PROBE = "gqa_probe"


def _probe(q, k, v, mask, scale, causal, *, extra=(), softcap=0.0, fill=None, groups: int = 0, **_):
    """Planning only: K/V heads merged by averaging each group (as the surgery makes), then exact attention."""
    b, g, m, e = k.shape
    ck = k.reshape(b, groups, g // groups, m, e).mean(2)
    cv = v.reshape(b, groups, g // groups, m, v.shape[-1]).mean(2)
    return kernel(q, ck, cv, mask, scale, causal, softcap=softcap, fill=fill)


KERNEL = register(KernelVariant(
    name="gqa_merge", kernel=kernel, reference=reference, spans=lambda **_: [EVERY_KEY],
    supports=frozenset({"softcap", "fill", "mask", "gqa"}), top_left=True, triton=TritonKernel("ranges"),
    surgery_params=("groups",), timed_as=_dense.KERNEL.name, cascade=cascade,
    cascade_params={"groups": int}, probes={PROBE: _probe}))
