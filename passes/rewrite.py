"""Graph surgery: replace each matched attention by one ``rewriter::attention`` call."""
from __future__ import annotations

import json
import logging
from typing import Optional

import torch
import torch.fx as fx

import codegen  # noqa: F401  (registers torch.ops.rewriter.attention)
from passes import graph as G
from passes.context import MaskTerm
from passes.emit import Emitter as _Emitter
from passes.find import Match, Operand, Unsupported

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _batch4(batch: tuple) -> tuple:
    if len(batch) == 0:
        return (1, 1)
    if len(batch) == 1:
        return (1, batch[0])
    if len(batch) == 2:
        return tuple(batch)
    return (G.prod(batch[:-1]), batch[-1])


def _canonical(em: _Emitter, op: Operand, batch: tuple, kv: bool) -> fx.Node:
    """Bring an operand to [B, H, L, D] (kv: [B, G, L, D] with G = 1 kept for broadcast heads)."""
    x = em.steps(op.node, op.steps)
    s = G.shape(x)
    xb, tail = s[:-2], s[-2:]
    if len(xb) < len(batch) and not G.same_sizes(xb, batch) and G.prod(xb) != G.prod(batch):
        for _ in range(len(batch) - len(xb)):
            x = em(aten.unsqueeze.default, x, 0)
        s = G.shape(x)
        xb = s[:-2]
    kv_groups = None  # kv heads kept un-repeated (MQA broadcast or enable_gqa): the op shares them
    if not G.same_sizes(xb, batch):
        if (kv and len(batch) >= 2 and len(xb) == len(batch) and G.same_sizes(xb[:-1], batch[:-1])
                and batch[-1] % xb[-1] == 0):
            kv_groups = xb[-1]
        elif len(xb) == len(batch) and all(a == 1 or a == b for a, b in zip(xb, batch)):
            x = em(aten.expand.default, x, [*batch, *tail])
        elif G.prod(xb) == G.prod(batch):
            x = em(aten.reshape.default, x, [*batch, *tail])
        else:
            raise Unsupported(f"operand batch {tuple(xb)} does not match the scores' batch {tuple(batch)}")
    b4 = list(_batch4(batch))
    if kv_groups is not None:
        b4[-1] = kv_groups
    return em.steps(x, [("reshape", (*b4, *tail))])


def _to_scores_layout(em: _Emitter, m: Match, term) -> fx.Node:
    """A mask term in the layout of the softmax's scores [*batch, P, M] (a baddbmm bias lives in [B*H, ...])."""
    x = term.node
    batch = tuple(m.batch)
    layout = tuple(term.layout) if term.layout is not None else None
    s = G.shape(x)
    if layout is None or len(layout) < 2 or G.same_sizes(layout[:-2], batch):
        return x
    if len(s) < len(layout):
        x = em(aten.reshape.default, x, [1] * (len(layout) - len(s)) + list(s))
        s = G.shape(x)
    tb, tail = s[:-2], list(s[-2:])
    if all(d == 1 for d in tb):
        return em(aten.reshape.default, x, [1] * len(batch) + tail)
    if not G.same_sizes(tb, layout[:-2]):
        x = em(aten.expand.default, x, [*layout[:-2], *tail])
    if G.prod(layout[:-2]) != G.prod(batch):
        raise Unsupported(f"a mask term in layout {layout} does not map onto the scores' batch {batch}")
    return em(aten.reshape.default, x, [*batch, *tail])


def _as_keep(em: _Emitter, m: Match, t) -> fx.Node:
    node = _to_scores_layout(em, m, t)
    if G.dtype(node) != torch.bool:
        node = em(torch.ops.prims.convert_element_type.default, node, torch.bool)
    return node if t.kind == "keep" else em(aten.logical_not.default, node)


def _combined_mask(em: _Emitter, m: Match, drop_band: bool = False) -> Optional[fx.Node]:
    """One mask tensor equal in effect to every mask op the graph applied to the scores (but the band's)."""
    a = m.analysis
    terms = [t for i, t in enumerate(m.masks) if not (drop_band and i in a.band_terms)]
    if not a.pass_mask or not terms:
        return None
    hide = [t for t in terms if t.kind != "add"]
    keep: Optional[fx.Node] = None
    for t in hide:
        term = _as_keep(em, m, t)
        keep = term if keep is None else em(aten.logical_and.default, keep, term)
    out = keep
    if not a.as_bool:
        out = None
        for t in terms:
            if t.kind == "add":
                term = _to_scores_layout(em, m, t)
                if t.factor != 1.0:
                    term = em(aten.mul.Tensor, term, t.factor)
                out = term if out is None else em(aten.add.Tensor, out, term)
        if keep is not None:
            fill = a.fill if a.fill is not None else float("-inf")
            # where(keep, 0.0, fill) with two scalars is not lowerable by Inductor (the backend's graphs are
            # already decomposed, so only core ops are emitted here)
            sizes, dev = em.exact_sizes(list(G.shape(keep))), G.val(keep).device
            zero = em(aten.full.default, sizes, 0.0, dtype=torch.float32, device=dev)
            hidden = em(aten.where.self, keep, zero,
                        em(aten.full.default, sizes, fill, dtype=torch.float32, device=dev))
            out = hidden if out is None else em(aten.add.Tensor, out, hidden)
    s = G.shape(out)
    if len(m.batch) > 2:
        out = em(aten.expand.default, out, [*m.batch, *s[-2:]])
        out = em(aten.reshape.default, out, [*_batch4(m.batch), *s[-2:]])
    elif len(s) > len(m.batch) + 2:
        raise Unsupported(f"mask of rank {len(s)} is wider than the scores")
    return out


def rewrite_site(graph: fx.Graph, m: Match, variant: str, params: dict, drop_band: bool = False,
                 extra: tuple = ()) -> fx.Node:
    """Replace one matched attention by ``rewriter::attention``; returns the new op node.

    ``drop_band``: the variant applies the site's causal/band pattern itself (its ``window``), so the
    mask terms that make it up are left out and only the rest (padding, bias) is passed.
    ``extra``: graph nodes of the tensors the variant takes besides q, k, v (latent up-projections).
    """
    if drop_band and not m.analysis.band_separable:
        raise Unsupported("the band is fused with other masking in one mask term; it cannot be dropped")
    em = _Emitter(graph, m.anchor)
    dt = G.dtype(m.q.node)
    if m.gqa_source is not None and len(m.batch) == 2:
        k = _canonical(em, Operand(m.gqa_source), (m.batch[0], G.shape(m.gqa_source)[1]), kv=True)
        v = _canonical(em, Operand(m.v_gqa_source), (m.batch[0], G.shape(m.v_gqa_source)[1]), kv=True)
    else:
        k = _canonical(em, m.k, m.batch, kv=True)
        v = _canonical(em, m.v, m.batch, kv=True)
    q = _canonical(em, m.q, m.batch, kv=False)
    for t, how, layout in m.q_scales:
        # (q·k) * t == (t * q)·k for a t constant along the keys: the op's scale stays one float
        factor = _to_scores_layout(em, m, MaskTerm("add", t, layout=layout))
        fs = G.shape(factor)
        if len(m.batch) > 2:
            factor = em(aten.expand.default, factor, [*m.batch, *fs[-2:]])
            factor = em(aten.reshape.default, factor, [*_batch4(m.batch), *fs[-2:]])
        q = em.steps(em(aten.mul.Tensor if how == "mul" else aten.div.Tensor, q, factor), [("to", dt)])
    k, v = em.steps(k, [("to", dt)]), em.steps(v, [("to", dt)])
    mask = _combined_mask(em, m, drop_band)
    causal = m.analysis.op_causal or (drop_band and m.site.causal)
    fill = m.analysis.fill if (mask is not None and G.dtype(mask) == torch.bool) else None
    out = em(
        torch.ops.rewriter.attention.default, q, k, v, mask, float(m.scale), bool(causal),
        variant, json.dumps(params, sort_keys=True), list(extra), float(m.softcap), fill,
    )
    p_len, f = G.shape(out)[-2:]
    out = em.steps(out, [("reshape", (*m.batch, p_len, f)), *m.out_steps, ("to", G.dtype(m.anchor))])
    m.anchor.replace_all_uses_with(out)
    for n in m.nodes:
        for u in list(n.users):
            if G.opname(u) == "_assert_tensor_metadata":
                graph.erase_node(u)
    return out


def rewrite_graph(gm: fx.GraphModule, chosen: list[tuple]) -> dict[int, str]:
    """Rewrite every (match, variant, params[, options]) in ``chosen``; returns {site index: reason} for failures.

    ``options`` is an optional dict of keyword arguments for ``rewrite_site`` (e.g. ``{"drop_band": True}``).
    """
    failures: dict[int, str] = {}
    replaced: set[fx.Node] = set()
    for m, variant, params, *opts in chosen:
        try:
            rewrite_site(gm.graph, m, variant, params, **(opts[0] if opts else {}))
            replaced.update(m.nodes)
        except Unsupported as e:
            failures[m.site.index] = str(e)
            logger.info("site %s left as it was: %s", m.site.name, e)
    # Dropout and fused attention count as impure (random), so the default DCE would keep the
    # replaced attention alive; nodes of a replaced site are known dead once unused.
    gm.graph.eliminate_dead_code(
        is_impure_node=lambda n: n.op in ("placeholder", "output") or (n not in replaced and n.is_impure())
    )
    gm.graph.lint()
    gm.recompile()
    return failures
