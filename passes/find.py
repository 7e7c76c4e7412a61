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
from passes.context import GraphContext, MaskTerm, NotAttention, Refused, Unsupported, first_line
from passes.masks import MaskAnalysis, analyse_masks
from passes.operands import (
    Operand,
    Step,
    canon,
    count_heads,
    kv_heads,
    projection_sources,
    repeat_kv_source,
    score_operands,
    value_operand,
)
from passes.refused import refused_site
from passes.scores import SHAPE_ONLY, fold_ops, scalar_operand, softmax_input, walk_probs, walk_scores
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
    # tensor-valued scales of the scores, constant along the keys, folded into q by the rewrite:
    # (tensor node, "mul" | "div", the scores' shape where it was applied)
    q_scales: tuple = ()


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
    q_scales: tuple = (),
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
        q_scales=tuple(q_scales),
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
    problems = []
    if float(dropout) > 0:
        problems.append("dropout inside the fused attention call is active (model in training mode)")
    if ctx.written and any(n in ctx.written for n in (q, k, v, mask)):
        problems.append("an operand of the attention is written in place (the graph is not functional)")
    masks = [MaskTerm("keep" if G.dtype(mask) == torch.bool else "add", mask)] if isinstance(mask, fx.Node) else []
    shape_q = G.shape(q)
    batch = tuple(shape_q[:-2])
    out_steps = [("reshape", tuple(G.shape(anchor)))]
    try:
        return _site(
            ctx, index, anchor, "sdpa", Operand(q), Operand(k), Operand(v), batch, masks, float(scale),
            bool(causal), out_steps, [], (node,), node, G.dtype(q), problems=tuple(problems),
        )
    except Exception as e:  # e.g. a data-dependent size no guard can decide: refused, with what is known
        logger.debug("could not describe %s", node.name, exc_info=True)
        raise Refused(f"the finder could not analyse this site ({type(e).__name__}: {first_line(e)})",
                      {"q": Operand(q), "k": Operand(k), "v": Operand(v), "masks": masks, "scale": float(scale),
                       "sdpa_causal": bool(causal), "spelling": "sdpa"}) from e


def _match_explicit(ctx: GraphContext, sm: fx.Node, index: int) -> Match:
    s_in = G.shape(sm)
    x_in, dim = softmax_input(sm)
    nd = len(s_in) if s_in is not None else 0
    if nd < 2 or not isinstance(dim, int) or dim % nd not in (nd - 1, nd - 2):
        raise NotAttention("softmax is not over the last dimension")
    keys_first = dim % nd == nd - 2  # softmax over dim -2: the scores are laid out [.., keys, queries]
    known: dict = {"s_in": s_in, "keys_first": keys_first}
    try:
        c1, ops, chain = walk_scores(ctx, x_in)
        known.update(ops=ops)
        # every ("transpose",) op swaps queries and keys once between the product and the softmax
        c1_swapped = keys_first != (sum(1 for op in ops if isinstance(op, tuple) and op[0] == "transpose") % 2 == 1)
        q, k = score_operands(c1)
        if c1_swapped:
            q, k = k, q
        known.update(q=q, k=k)
    except Unsupported as e:
        raise Refused(str(e), known) from e
    try:
        walked = walk_probs(ctx, sm)
    except Unsupported as e:
        raise Refused(str(e), known) from e
    c2, probs, post, notes, p_swapped, _ = walked
    if c2 is None:
        raise NotAttention("softmax is not followed by a product")
    if k.node not in ctx.activations:
        raise NotAttention("keys are weights, not activations (classifier or router)")
    batch = tuple(G.shape(x_in)[:-2])
    pm = (s_in[-1], s_in[-2]) if keys_first else (s_in[-2], s_in[-1])  # (queries, keys)
    v_swapped = keys_first != p_swapped  # the probabilities reach the product as [.., keys, queries]
    sp = G.shape(probs)
    try:
        if sp is None or not G.same_sizes(sp[-2:], pm[::-1] if v_swapped else pm):
            raise Unsupported("the probabilities are re-laid out before the value product")
        v, out_steps = value_operand(c2, probs, len(sp) - 2, v_swapped)
    except Unsupported as e:
        raise Refused(str(e), known) from e
    if v.node not in ctx.activations:
        raise NotAttention("values are weights, not activations (pooling over weights)")
    known.update(v=v)
    problems = list(walked.problems)
    inside = _between(ctx, c1, x_in, sm)
    for node in chain:
        # a user that reaches no output (a clone kept for inspection) is dead code, not an outside use
        outside = [u for u in G.users(node) if G.opname(u) not in SHAPE_ONLY and u in ctx.live and u not in inside]
        if node is not x_in and outside:
            problems.append(f"an intermediate of the scores ({node.name}) is used outside the attention")
            break
    if ctx.written and any(n in ctx.written for n in (c1, *chain, sm, *post, q.node, k.node, v.node)):
        problems.append("the scores or an operand of the attention are written in place (the graph is not functional)")
    scale, softcap, masks, fold_problems, q_scales = fold_ops(ops, c1_swapped)
    problems += fold_problems
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
        problems.append("the scores change size between product and softmax")
    if q_scales:
        notes = [*notes, "a tensor-valued scale of the scores (per head or per query) is folded into q"]
    spelling = G.opname(c1)
    try:
        return _site(
            ctx, index, c2, spelling, q, k, v, batch, masks, scale, False, out_steps, notes,
            tuple([c1, *chain, sm, *post, c2]), sm, G.dtype(x_in), softcap, tuple(problems), q_scales,
        )
    except Exception as e:  # e.g. a data-dependent size no guard can decide: refused, with what is known
        logger.debug("could not describe %s", sm.name, exc_info=True)
        raise Refused(f"the finder could not analyse this site ({type(e).__name__}: {first_line(e)})",
                      {**known, "masks": masks, "scale": scale, "spelling": spelling}) from e


def _between(ctx: GraphContext, c1: fx.Node, x_in: fx.Node, sm: fx.Node) -> set:
    """Nodes on a dataflow path from the scores product to the softmax input (the scores' own expression,
    including the pieces of a region write that read the scores and write them back)."""
    order = ctx.order
    stop = order.get(sm, len(order))
    ahead: set = {c1}
    stack = [c1]
    while stack:  # forward from the product, never past the softmax in graph order
        for u in stack.pop().users:
            if u not in ahead and order.get(u, stop) < stop:
                ahead.add(u)
                stack.append(u)
    inside: set = {x_in}
    stack = [x_in]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in ahead and a not in inside:
                inside.add(a)
                stack.append(a)
    return inside


@dataclass(frozen=True)
class Rejection:
    """A softmax or fused call that was looked at and not reported, with the reason (for debugging)."""

    node: str
    reason: str


def find_matches(ctx: GraphContext) -> tuple[list[Match], list[Rejection]]:
    """Every attention in ``ctx.graph`` in graph order, plus the softmaxes that were not attention.

    Never raises for a graph's contents: a site the finder cannot analyse is reported, unrewritten,
    with the reason.
    """
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
        except Refused as e:
            m = _refused_match(ctx, node, len(matches), str(e), e.known)
        except Unsupported as e:
            m = _refused_match(ctx, node, len(matches), str(e), {})
        except Exception as e:  # a graph we did not foresee: the site stays as it was, never a traceback
            logger.debug("could not analyse %s", node.name, exc_info=True)
            why = f"the finder could not analyse this site ({type(e).__name__}: {first_line(e)})"
            m = _refused_match(ctx, node, len(matches), why, {})
        matches.append(m)
    return matches, rejected


def _refused_match(ctx: GraphContext, node: fx.Node, index: int, reason: str, known: dict) -> Match:
    """A site we recognised but cannot rewrite: reported with its reason and what is known, left as it was."""
    site = refused_site(ctx, node, index, reason, known)
    return Match(site, node, Operand(node), Operand(node), Operand(node), (), [], [], 1.0, False)
