"""The description of a site the finder recognised but will not rewrite: what is known, "unknown" for the rest.

A refused site is reported so the user sees it and why; its flags must not be guesses. Each field
is read from the parts of the site the finder got to (q, k, v operands, mask terms) and left at
its unknown value (-1, None, "unknown") when that part was not reached or cannot be read.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch.fx as fx

from passes import graph as G
from passes.context import GraphContext
from passes.masks import analyse_masks
from passes.operands import canon, count_heads, kv_heads, projection_sources
from passes.scores import fold_ops
from passes.site import AttentionSite, as_int

logger = logging.getLogger(__name__)


def _try(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # a field that cannot be read stays unknown
        logger.debug("unknown field of a refused site: %s: %s", type(e).__name__, e)
        return default


def _sdpa_known(node: fx.Node) -> dict:
    from passes.operands import Operand
    q, k, v = (node.args[i] if len(node.args) > i else None for i in range(3))
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        return {}
    return {"q": Operand(q), "k": Operand(k), "v": Operand(v), "spelling": "sdpa"}


def refused_site(ctx: GraphContext, node: fx.Node, index: int, reason: str, known: dict) -> AttentionSite:
    """An unrewritable site at softmax or fused call ``node`` described from ``known`` (what the finder saw)."""
    if not known and G.opname(node) in G.SDPA_OPS:
        known = _sdpa_known(node)
    q, k, v = known.get("q"), known.get("k"), known.get("v")
    cq = _try(lambda: canon(q), None) if q is not None else None
    ck = _try(lambda: canon(k), None) if k is not None else None
    cv = _try(lambda: canon(v), None) if v is not None else None
    s_in: Optional[tuple] = known.get("s_in")
    p_len = m_len = -1
    if cq is not None and ck is not None:
        p_len, m_len = as_int(cq[-2]), as_int(ck[-2])
    elif s_in is not None and len(s_in) >= 2:
        p_len, m_len = (as_int(s_in[-1]), as_int(s_in[-2])) if known.get("keys_first") else (
            as_int(s_in[-2]), as_int(s_in[-1]))
    head_dim = as_int(cq[-1]) if cq is not None else -1
    batch = tuple(cq[:-2]) if cq is not None else (tuple(s_in[:-2]) if s_in is not None else None)
    heads = kv = -1
    if q is not None and batch is not None and head_dim > 0:
        heads = _try(lambda: count_heads(q.node, batch, head_dim), -1)
        bsz = as_int(batch[0]) if len(batch) >= 2 else max(1, as_int(G.prod(batch)) // max(1, heads))
        if k is not None and heads > 0 and m_len > 0:
            kv = _try(lambda: kv_heads(k.node, heads, bsz, m_len, head_dim), -1)
    causal: Optional[bool] = None
    kind = "unknown"
    masks = known.get("masks")
    if masks is None and known.get("ops") is not None:
        masks = _try(lambda: fold_ops(known["ops"])[2], None)
    if masks is not None and p_len > 0 and m_len > 0:
        analysis = _try(lambda: analyse_masks(ctx, masks, p_len, m_len, bool(known.get("sdpa_causal")), None), None)
        if analysis is not None:
            causal, kind = analysis.causal, analysis.kind
    is_cross: Optional[bool] = None
    if q is not None and k is not None:
        is_cross = _try(lambda: projection_sources(ctx, q.node).isdisjoint(projection_sources(ctx, k.node)), None)
    nb = -1
    if batch is not None and len(batch) >= 2:
        nb = as_int(batch[0])
    return AttentionSite(
        name=G.module_path(node), index=index, spelling=known.get("spelling", G.opname(node)), causal=causal,
        mask_kind=kind, is_cross=is_cross, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        v_head_dim=as_int(cv[-1]) if cv is not None else -1, q_len=p_len, kv_len=m_len, batch=nb,
        scale=float(known.get("scale", math.nan)), rewritable=False, reason=reason,
    )
