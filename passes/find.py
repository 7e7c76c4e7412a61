"""Find attention in an ATen FX graph from its dataflow, whatever spelling the author used.

Two shapes are recognised:
  * a fused call (``scaled_dot_product_attention`` and its decomposed flash/efficient/math forms);
  * an explicit one: contraction (matmul | bmm | mm | einsum | baddbmm) -> scale -> masks ->
    softmax (maybe in float32) -> casts / dropout -> contraction with the values.
A softmax-then-contraction is attention only when its keys and values come from activations
(a classifier or a router contracts with a weight instead).

The work is split by concern: ``scores`` walks the scores and probabilities, ``operands`` brings
q/k/v to a canonical layout and counts heads, ``masks`` says what the masks and modifiers mean.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from passes import graph as G
from passes.context import GraphContext, MaskTerm, NotAttention, Unsupported
from passes.masks import MaskAnalysis, analyse_masks
from passes.operands import (
    Operand, Step, canon, count_heads, kv_heads, projection_sources, repeat_kv_source, score_operands,
    value_operand,
)
from passes.scores import SHAPE_ONLY, scalar_operand, softmax_input, walk_probs, walk_scores
from passes.site import AttentionSite, as_int

logger = logging.getLogger(__name__)

__all__ = ["GraphContext", "Match", "MaskTerm", "NotAttention", "Operand", "Rejection", "Unsupported",
           "find_matches", "softmax_input"]


@dataclass
class Match:
    """An attention site together with the graph nodes the rewrite needs (internal)."""

    site: AttentionSite
    anchor: fx.Node  # node whose value the rewritten op replaces
    q: Operand
    k: Operand
    v: Operand
    batch: tuple  # canonical batch sizes of the scores
    out_steps: list[Step]  # from canonical [*batch, P, F] to the anchor's layout
    masks: list[MaskTerm]
    scale: float
    sdpa_causal: bool  # causal flag the graph passed to a fused call
    analysis: Optional[MaskAnalysis] = None
    gqa_source: Optional[fx.Node] = None  # k/v before repeat_kv, when that pattern was seen
    v_gqa_source: Optional[fx.Node] = None
    nodes: tuple = ()
    softcap: float = 0.0  # scores are soft-capped (softcap * tanh(s / softcap)) before the masks


def _site(
    ctx: GraphContext,
    index: int,
    anchor: fx.Node,
    spelling: str,
    q: Operand,
    k: Operand,
    v: Operand,
    batch: tuple,
    masks: list[MaskTerm],
    scale: float,
    sdpa_causal: bool,
    out_steps: list[Step],
    notes: list[str],
    nodes: tuple,
    name_node: fx.Node,
    score_dtype: Optional[torch.dtype] = None,
    softcap: float = 0.0,
    problems: tuple = (),
) -> Match:
    cq, ck, cv = canon(q), canon(k), canon(v)
    p_len, head_dim = cq[-2:]
    m_len, v_head_dim = ck[-2], cv[-1]
    analysis = analyse_masks(ctx, masks, p_len, m_len, sdpa_causal, score_dtype)
    kv_src = repeat_kv_source(k.node) if not k.steps else None
    vv_src = repeat_kv_source(v.node) if not v.steps else None
    heads = count_heads(q.node, batch, as_int(head_dim))
    # Flattened [B*H, ...] layouts (bmm) carry the batch inside the first dim.
    bsz = as_int(batch[0]) if len(batch) >= 2 else max(1, as_int(G.prod(batch)) // max(1, heads))
    n_kv = kv_heads(k.node, heads, bsz, as_int(m_len), as_int(head_dim))
    kb = ck[:-2]
    if len(batch) >= 2 and len(kb) == len(batch) and 0 < as_int(kb[-1]) < as_int(batch[-1]):
        n_kv = as_int(kb[-1])  # broadcast (MQA) or enable_gqa heads
    reason = "; ".join(dict.fromkeys([*problems, *([analysis.reason] if analysis.reason else [])]))
    q_src = projection_sources(ctx, q.node)
    k_src = projection_sources(ctx, k.node)
    is_cross = q_src.isdisjoint(k_src)
    site = AttentionSite(
        name=G.module_path(name_node),
        index=index,
        spelling=spelling,
        causal=analysis.causal,
        mask_kind=analysis.kind,
        is_cross=is_cross,
        num_heads=heads,
        num_kv_heads=n_kv,
        head_dim=as_int(head_dim),
        v_head_dim=as_int(v_head_dim),
        q_len=as_int(p_len),
        kv_len=as_int(m_len),
        batch=bsz,
        scale=scale,
        rewritable=not reason,
        reason=reason,
        notes=tuple(notes),
        window=analysis.window,
        softcap=softcap,
        has_bias=analysis.has_bias,
        fill=analysis.fill if analysis.as_bool else None,
        score_ops=_score_ops(nodes[1:-1], as_int(G.prod(G.shape(nodes[0]) or ()))) if spelling != "sdpa" else 0,
    )
    return Match(
        site=site,
        anchor=anchor,
        q=q,
        k=k,
        v=v,
        batch=tuple(batch),
        out_steps=out_steps,
        masks=masks,
        scale=scale,
        sdpa_causal=sdpa_causal,
        analysis=analysis,
        softcap=softcap,
        gqa_source=kv_src if (kv_src is not None and vv_src is not None) else None,
        v_gqa_source=vv_src if (kv_src is not None and vv_src is not None) else None,
        nodes=nodes,
    )


def _score_ops(nodes: tuple, elems: int) -> int:
    """How many of ``nodes`` (between the scores product and the value product) are separate element-wise
    passes over a score-sized tensor: what eager attention pays beyond its three kernels (not the softmax)."""
    if elems <= 0:
        return 0
    return sum(1 for n in nodes if G.opname(n) not in G.VIEW_OPS | G.SOFTMAX_OPS | SHAPE_ONLY
               and G.shape(n) is not None and as_int(G.prod(G.shape(n))) == elems)


def _match_sdpa(ctx: GraphContext, node: fx.Node, index: int) -> Match:
    name = G.opname(node)
    q, k, v = node.args[0], node.args[1], node.args[2]
    if name == "scaled_dot_product_attention":
        mask = G.arg(node, 3, "attn_mask")
        dropout = G.arg(node, 4, "dropout_p", 0.0)
        causal = G.arg(node, 5, "is_causal", False)
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        anchor = node
    else:
        if name == "_scaled_dot_product_flash_attention_for_cpu":
            dropout, causal = G.arg(node, 3, "dropout_p", 0.0), G.arg(node, 4, "is_causal", False)
            mask = node.kwargs.get("attn_mask")
        elif name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
            mask = G.arg(node, 3, "attn_bias")
            dropout = G.arg(node, 5, "dropout_p", 0.0)
            causal = G.arg(node, 6, "is_causal", False)
        elif name == "_scaled_dot_product_attention_math":
            mask = G.arg(node, 3, "attn_mask")
            dropout = G.arg(node, 4, "dropout_p", 0.0)
            causal = G.arg(node, 5, "is_causal", False)
        else:  # _scaled_dot_product_flash_attention
            mask = None
            dropout = G.arg(node, 3, "dropout_p", 0.0)
            causal = G.arg(node, 4, "is_causal", False)
        scale = node.kwargs.get("scale")
        outs = [u for u in node.users if G.opname(u) == "getitem" and u.args[1] == 0]
        if len(outs) != 1:
            raise NotAttention("fused attention output is not read")
        anchor = outs[0]
    if scale is None:
        scale = 1.0 / math.sqrt(as_int(G.shape(q)[-1]))
    if float(dropout) > 0:
        raise Unsupported("dropout inside the fused attention call is active (model in training mode)")
    masks = [MaskTerm("keep" if G.dtype(mask) == torch.bool else "add", mask)] if isinstance(mask, fx.Node) else []
    shape_q = G.shape(q)
    batch = tuple(shape_q[:-2])
    out_steps = [("reshape", tuple(G.shape(anchor)))]
    return _site(
        ctx, index, anchor, "sdpa", Operand(q), Operand(k), Operand(v), batch, masks, float(scale),
        bool(causal), out_steps, [], (node,), node, G.dtype(q),
    )


def _match_explicit(ctx: GraphContext, sm: fx.Node, index: int) -> Match:
    s_in = G.shape(sm)
    x_in, dim = softmax_input(sm)
    if s_in is None or len(s_in) < 2 or dim is None or dim % len(s_in) != len(s_in) - 1:
        raise NotAttention("softmax is not over the last dimension")
    c1, ops, chain = walk_scores(ctx, x_in)
    c2, probs, post, notes = walk_probs(sm)
    if c2 is None:
        raise NotAttention("softmax is not followed by a product")
    q, k = score_operands(c1)
    if k.node not in ctx.activations:
        raise NotAttention("keys are weights, not activations (classifier or router)")
    batch = tuple(G.shape(x_in)[:-2])
    sp = G.shape(probs)
    if sp is None or not G.same_sizes(sp[-2:], s_in[-2:]):
        raise Unsupported("the probabilities are re-laid out before the value product")
    v, out_steps = value_operand(c2, probs, len(G.shape(probs)) - 2)
    if v.node not in ctx.activations:
        raise NotAttention("values are weights, not activations (pooling over weights)")
    for node in chain:
        if node is not x_in and len([u for u in G.users(node) if G.opname(u) not in SHAPE_ONLY]) > 1:
            raise Unsupported(f"an intermediate of the scores ({node.name}) is used outside the attention")
    scale, softcap, masks, problems = _fold_ops(ops)
    # A scale applied to q or k before the product is part of the attention's scale.
    for opnd in (q, k):
        while True:
            so = scalar_operand(ctx, opnd.node)
            if so is None:
                break
            opnd.node, s = so
            scale *= s
    if not any(
        G.same_sizes(G.shape(n), s_in) or G.prod(G.shape(n)) == G.prod(s_in) for n in [c1] + chain if G.shape(n)
    ):
        raise Unsupported("the scores change size between product and softmax")
    spelling = G.opname(c1)
    return _site(
        ctx, index, c2, spelling, q, k, v, batch, masks, scale, False, out_steps, notes,
        tuple([c1, *chain, sm, *post, c2]), sm, G.dtype(x_in), softcap, tuple(problems),
    )


def _fold_ops(ops: list) -> tuple[float, float, list[MaskTerm], list[str]]:
    """(scale, softcap, masks, problems) from the scores ops in forward order.

    ``a * tanh(b * s)`` equals the op's ``c * tanh(s' / c)`` with c = |a| and s' = a·b·s, so any
    scalar placement around the tanh is one soft-cap; masks must come after it (the op caps first).
    """
    scale, post, softcap = 1.0, 1.0, 0.0
    masks: list[MaskTerm] = []
    problems: list[str] = []
    capped = False
    for op in ops:
        if isinstance(op, MaskTerm):
            masks.append(op)
        elif op[0] == "unsupported":
            problems.append(op[1])
        elif op[0] == "tanh":
            if capped:
                problems.append("the scores pass through tanh twice")
            if masks:
                problems.append("a mask or bias is applied before the soft-cap (tanh); rewriter::attention "
                                "caps the scores first")
            capped = True
        else:
            s = op[1]
            if capped:
                post *= s
            else:
                scale *= s
            for m in masks:
                if m.kind == "add":
                    m.factor *= s
                else:
                    m.fill *= s
    if capped:
        if post == 0:
            problems.append("the soft-capped scores are multiplied by zero")
        softcap, scale = abs(post), scale * post
    return scale, softcap, masks, problems


@dataclass(frozen=True)
class Rejection:
    """A softmax or fused call that was looked at and not reported, with the reason (for debugging)."""

    node: str
    reason: str


def find_matches(ctx: GraphContext) -> tuple[list[Match], list[Rejection]]:
    """Every attention in ``ctx.graph`` in graph order, plus the softmaxes that were not attention."""
    matches: list[Match] = []
    rejected: list[Rejection] = []
    for node in list(ctx.graph.nodes):
        name = G.opname(node)
        if name not in G.SDPA_OPS and softmax_input(node) is None:
            continue
        try:
            if name in G.SDPA_OPS:
                m = _match_sdpa(ctx, node, len(matches))
            else:
                m = _match_explicit(ctx, node, len(matches))
        except NotAttention as e:
            rejected.append(Rejection(node.name, str(e)))
            logger.debug("%s is not attention: %s", node.name, e)
            continue
        except Unsupported as e:
            m = _unsupported_site(ctx, node, len(matches), str(e))
        matches.append(m)
    return matches, rejected


def _unsupported_site(ctx: GraphContext, node: fx.Node, index: int, reason: str) -> Match:
    """A site we recognised but cannot rewrite: reported with its reason, left as it was."""
    s = G.shape(node) or (1, 1, 1, 1)
    site = AttentionSite(
        name=G.module_path(node), index=index, spelling=G.opname(node), causal=False,
        mask_kind="unknown", is_cross=False, num_heads=as_int(s[1]) if len(s) >= 4 else 1,
        num_kv_heads=as_int(s[1]) if len(s) >= 4 else 1, head_dim=-1, v_head_dim=-1,
        q_len=as_int(s[-2]), kv_len=-1, batch=as_int(s[0]) if len(s) >= 3 else 1, scale=float("nan"),
        rewritable=False, reason=reason,
    )
    return Match(site, node, Operand(node), Operand(node), Operand(node), (), [], [], 1.0, False)
