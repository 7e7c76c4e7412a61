"""Find attention in an ATen FX graph from its dataflow, whatever spelling the author used.

Two shapes are recognised:
  * a fused call (``scaled_dot_product_attention`` and its decomposed flash/efficient/math forms);
  * an explicit one: contraction (matmul | bmm | mm | einsum | baddbmm) -> scale -> masks ->
    softmax (maybe in float32) -> casts / dropout -> contraction with the values.
A softmax-then-contraction is attention only when its keys and values come from activations
(a classifier or a router contracts with a weight instead).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from passes import graph as G
from passes.masks import MaskAnalysis, analyse_masks
from passes.site import AttentionSite, as_int

logger = logging.getLogger(__name__)

# A layout step applied to an operand to bring it to [*batch, L, D]: ("permute", perm),
# ("transpose",), ("unsqueeze", dim) or ("reshape", sizes).
Step = tuple


@dataclass
class Operand:
    """A tensor feeding the attention and the view steps that bring it to canonical layout."""

    node: fx.Node
    steps: list[Step] = field(default_factory=list)


@dataclass
class MaskTerm:
    """One mask operation on the scores, in the order the graph applies it."""

    kind: str  # "add" (scores + node*factor) | "keep" (where node, scores, fill) | "drop" (masked_fill)
    node: fx.Node
    factor: float = 1.0
    fill: float = -math.inf


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


class NotAttention(Exception):
    """The pattern is not an attention (no report)."""


class Unsupported(Exception):
    """The pattern is an attention we cannot rewrite safely (reported with the reason)."""


@dataclass
class GraphContext:
    """What the finder needs to know about a graph beyond its nodes."""

    graph: fx.Graph
    user_inputs: set  # placeholder nodes that carry the caller's data
    constants: dict  # placeholder/get_attr name -> tensor (parameters, buffers, lifted constants)
    dynamic: bool = False  # symbolic shapes: static masks are not evaluated
    evaluated: dict = field(default_factory=dict)  # static mask node -> computed value (or None)
    _activations: Optional[set] = None
    _dg: Any = None

    @property
    def dg(self):
        """The graph as a networkx DiGraph (built once)."""
        if self._dg is None:
            self._dg = G.to_digraph(self.graph)
        return self._dg

    @property
    def activations(self) -> set:
        """Nodes whose values depend on the caller's inputs."""
        if self._activations is None:
            self._activations = G.depends_on(self.dg, self.user_inputs)
        return self._activations


# ----------------------------------------------------------------------------- scores side


def _is_transpose_last2(node: fx.Node) -> bool:
    name = G.opname(node)
    s = G.shape(node)
    if s is None or len(s) < 2:
        return False
    nd = len(s)
    if name == "transpose":
        dims = {G.arg(node, 1, "dim0") % nd, G.arg(node, 2, "dim1") % nd}
        return dims == {nd - 1, nd - 2}
    if name == "permute":
        perm = [p % nd for p in node.args[1]]
        return perm == list(range(nd - 2)) + [nd - 1, nd - 2]
    if name == "t":
        return nd == 2
    return False


def _scalar_operand(ctx: GraphContext, node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """For mul/div of a tensor by a known scalar: (tensor, factor)."""
    name = G.opname(node)
    if name not in ("mul", "div"):
        return None
    a, b = node.args[0], node.args[1]
    sb = G.scalar_value(b, ctx.constants)
    if sb is not None and isinstance(a, fx.Node):
        if name == "div":
            return (a, 1.0 / sb) if sb != 0 else None
        return a, sb
    sa = G.scalar_value(a, ctx.constants)
    if name == "mul" and sa is not None and isinstance(b, fx.Node):
        return b, sa
    return None


_PASS_THROUGH = G.VIEW_OPS | G.CAST_OPS


def _singleton_permute(node: fx.Node) -> bool:
    """A permute that only moves size-1 dims (decomposed einsums emit these): values keep their layout."""
    if G.opname(node) != "permute":
        return False
    s = G.shape(node.args[0])
    if s is None:
        return False
    big = [p for p in node.args[1] if s[p] != 1]
    return big == sorted(big)


def _score_root(ctx: GraphContext, x: Any, depth: int = 0) -> Optional[fx.Node]:
    """The contraction that produced scores ``x`` through scale/mask/view ops, or None."""
    if not isinstance(x, fx.Node) or depth > 40:
        return None
    name = G.opname(x)
    if name in G.CONTRACTION_OPS:
        return x
    if name in _PASS_THROUGH or _singleton_permute(x):
        return _score_root(ctx, x.args[0], depth + 1)
    if name in ("mul", "div"):
        so = _scalar_operand(ctx, x)
        return _score_root(ctx, so[0], depth + 1) if so else None
    if name in ("add", "sub"):
        roots = [r for r in (_score_root(ctx, a, depth + 1) for a in x.args[:2]) if r is not None]
        return roots[0] if len(roots) == 1 else None
    if name == "masked_fill":
        return _score_root(ctx, x.args[0], depth + 1)
    if name == "where":
        roots = [r for r in (_score_root(ctx, a, depth + 1) for a in x.args[1:3]) if r is not None]
        return roots[0] if len(roots) == 1 else None
    return None


def _fill_value(ctx: GraphContext, x: Any) -> float:
    v = G.scalar_value(x, ctx.constants)
    if v is None:
        raise Unsupported(f"mask fill value {getattr(x, 'name', x)!r} is not a known constant")
    return v


def _walk_scores(ctx: GraphContext, x: fx.Node) -> tuple[fx.Node, list, list[fx.Node]]:
    """Walk back from the softmax input to the scores contraction.

    Returns (contraction, ops in forward order, chain nodes). ops are ("scale", s) or MaskTerm.
    """
    ops: list = []
    chain: list[fx.Node] = []
    while True:
        name = G.opname(x)
        if name in G.CONTRACTION_OPS:
            if name == "baddbmm":
                beta = G.arg(x, 3, "beta", 1)
                alpha = G.arg(x, 4, "alpha", 1)
                # beta*bias + alpha*(q@kT) == (q@kT + bias*beta/alpha) * alpha; ops are collected backwards.
                ops.append(("scale", float(alpha)))
                if float(beta) != 0.0:
                    ops.append(MaskTerm("add", x.args[0], factor=float(beta) / float(alpha)))
            ops.reverse()
            return x, ops, chain
        chain.append(x)
        if name in _PASS_THROUGH or _singleton_permute(x):
            x = x.args[0]
            continue
        if name in ("mul", "div"):
            so = _scalar_operand(ctx, x)
            if so is None:
                raise NotAttention(f"scores multiplied by a tensor ({x.name})")
            ops.append(("scale", so[1]))
            x = so[0]
            continue
        if name in ("add", "sub"):
            a, b = x.args[0], x.args[1]
            alpha = x.kwargs.get("alpha", 1)
            ra, rb = _score_root(ctx, a), _score_root(ctx, b)
            if (ra is None) == (rb is None):
                raise NotAttention(f"cannot tell scores from bias at {x.name}")
            if ra is not None:
                sign = -1.0 if name == "sub" else 1.0
                if isinstance(b, fx.Node):
                    ops.append(MaskTerm("add", b, factor=sign * float(alpha)))
                x = a
            else:
                if name == "sub" or float(alpha) != 1.0:
                    raise Unsupported(f"scores are subtracted or scaled inside {x.name}")
                if isinstance(a, fx.Node):
                    ops.append(MaskTerm("add", a))
                x = b
            continue
        if name == "masked_fill":
            ops.append(MaskTerm("drop", x.args[1], fill=_fill_value(ctx, x.args[2])))
            x = x.args[0]
            continue
        if name == "where":
            cond, a, b = x.args[0], x.args[1], x.args[2]
            ra, rb = _score_root(ctx, a), _score_root(ctx, b)
            if (ra is None) == (rb is None):
                raise NotAttention(f"cannot tell scores from fill at {x.name}")
            if ra is not None:
                ops.append(MaskTerm("keep", cond, fill=_fill_value(ctx, b)))
                x = a
            else:
                ops.append(MaskTerm("drop", cond, fill=_fill_value(ctx, a)))
                x = b
            continue
        raise NotAttention(f"{name or x.op} between scores and softmax")


def _parse_einsum(eq: str) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise Unsupported(f"einsum {eq!r} uses an ellipsis or an implicit output")
    lhs, out = eq.split("->")
    return lhs.split(","), out


def _align_steps(letters: str, target: list[str]) -> list[Step]:
    """Steps that permute ``letters`` into the order of ``target``, unsqueezing missing letters."""
    present = [t for t in target if t in letters]
    perm = [letters.index(t) for t in present]
    steps: list[Step] = []
    if perm != list(range(len(letters))):
        steps.append(("permute", perm))
    for pos, t in enumerate(target):
        if t not in letters:
            steps.append(("unsqueeze", pos))
    return steps


def _score_operands(c1: fx.Node) -> tuple[Operand, Operand]:
    """q [*b, P, E] and k [*b, M, E] operands of the scores contraction."""
    name = G.opname(c1)
    if name == "einsum":
        ins, out = _parse_einsum(c1.args[0])
        a, b = c1.args[1]
        if len(ins) != 2 or len(out) < 2:
            raise Unsupported(f"einsum {c1.args[0]!r} is not a two-operand product")
        i, j = out[-2], out[-1]
        if i in ins[1] and j in ins[0]:
            ins, (a, b) = ins[::-1], (b, a)
        sa, sb = ins
        contracted = (set(sa) & set(sb)) - set(out)
        if len(contracted) != 1 or i not in sa or i in sb or j not in sb or j in sa:
            raise Unsupported(f"einsum {c1.args[0]!r} is not q·kᵀ over one head dim")
        (d,) = contracted
        batch = list(out[:-2])
        for s in (sa, sb):
            if set(s) - set(out) - {d}:
                raise Unsupported(f"einsum {c1.args[0]!r} reduces over more than the head dim")
        return (
            Operand(a, _align_steps(sa, batch + [i, d])),
            Operand(b, _align_steps(sb, batch + [j, d])),
        )
    a, b = (c1.args[1], c1.args[2]) if name == "baddbmm" else (c1.args[0], c1.args[1])
    sa, sb = G.shape(a), G.shape(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        raise Unsupported(f"{name} operands are not matrices")
    if _is_transpose_last2(b) and G.opname(b) != "t":
        return Operand(a), Operand(b.args[0])
    return Operand(a), Operand(b, [("transpose",)])


def _value_operand(c2: fx.Node, probs: fx.Node, nbatch: int) -> tuple[Operand, list[Step]]:
    """v [*b, M, F] and the steps from canonical output [*b, P, F] to c2's layout."""
    name = G.opname(c2)
    if name == "einsum":
        ins, out = _parse_einsum(c2.args[0])
        ops = list(c2.args[1])
        if len(ins) != 2 or probs not in ops:
            raise Unsupported(f"einsum {c2.args[0]!r} is not probs·v")
        pi = ops.index(probs)
        sp, sv = ins[pi], ins[1 - pi]
        vnode = ops[1 - pi]
        if len(sp) != nbatch + 2:
            raise Unsupported(f"einsum {c2.args[0]!r}: probs rank differs from the scores")
        i, j = sp[-2], sp[-1]
        fs = set(sv) - set(sp)
        if j not in sv or j in out or len(fs) != 1 or set(out) != set(sp[:-1]) | fs:
            raise Unsupported(f"einsum {c2.args[0]!r} is not a reduction of probs over keys")
        (f,) = fs
        batch = list(sp[:-2])
        canon = batch + [i, f]
        perm = [canon.index(t) for t in out]
        out_steps = [("permute", perm)] if perm != list(range(len(canon))) else []
        return Operand(vnode, _align_steps(sv, batch + [j, f])), out_steps
    if c2.args[0] is not probs:
        raise NotAttention("probabilities are the right operand of the product")
    v = c2.args[1]
    return Operand(v), [("reshape", tuple(G.shape(c2)))]


def _keeps_layout(start: fx.Node, chain: list[fx.Node]) -> bool:
    """Replay a chain of view/permute ops on an index tensor: True if the values keep their order."""
    s = G.shape(start)
    try:
        with unset_fake_temporarily():  # inside a compiler a fake mode is active; replay for real
            return _replay_in_order(s, chain)
    except Exception:  # symbolic sizes or an op we cannot replay: be conservative
        return False


def _replay_in_order(s: tuple, chain: list[fx.Node]) -> bool:
    x = torch.arange(int(G.prod(s))).reshape([int(d) for d in s])
    for n in chain:
        if G.opname(n) in G.CAST_OPS | G.DROPOUT_OPS:
            continue
        x = n.target(x, *n.args[1:], **{k: v for k, v in n.kwargs.items() if k != "memory_format"})
    return bool(torch.equal(x.reshape(-1), torch.arange(x.numel())))


def _walk_probs(sm: fx.Node) -> tuple[Optional[fx.Node], Optional[fx.Node], list[fx.Node], list[str]]:
    """Follow the softmax forward to the values contraction: (contraction, its probs operand, chain, notes)."""
    chain: list[fx.Node] = []
    notes: list[str] = []
    x = sm
    while True:
        us = G.users(x)
        nxt = [u for u in us if G.opname(u) in (G.CONTRACTION_OPS - {"baddbmm"})]
        if len(nxt) != 1:
            nxt = [u for u in us if G.opname(u) in (_PASS_THROUGH | G.DROPOUT_OPS | {"permute"})]
        if len(us) > 1:
            notes.append("the attention probabilities are also used elsewhere (returned weights?); they are still computed")
        if len(nxt) != 1:
            return None, None, chain, notes
        u = nxt[0]
        name = G.opname(u)
        if name in G.CONTRACTION_OPS and name not in ("baddbmm",):
            if any(G.opname(n) == "permute" for n in chain) and not _keeps_layout(sm, chain):
                raise Unsupported("the probabilities are permuted before the value product")
            return u, x, chain, notes
        if name == "native_dropout":
            raise Unsupported("native_dropout on the probabilities (model in training mode)")
        if name in G.DROPOUT_OPS:
            p = float(G.arg(u, 1, "p", 0.0))
            train = G.arg(u, 2, "train", True)
            if p > 0 and train:
                raise Unsupported("dropout on the attention probabilities is active (model in training mode)")
        chain.append(u)
        x = u


# ----------------------------------------------------------------------------- heads, cross


def _repeat_kv_source(node: fx.Node) -> Optional[fx.Node]:
    """If ``node`` is repeat_kv(x) = reshape(expand(x[:, :, None])), return x [B, G, M, D]."""
    x = node
    if G.opname(x) in ("reshape", "view", "_unsafe_view"):
        x = x.args[0]
        while G.opname(x) in ("clone", "contiguous"):
            x = x.args[0]
        if G.opname(x) == "expand":
            src = x.args[0]
            s_in, s_out = G.shape(src), G.shape(x)
            if s_in is not None and len(s_in) == 5 and s_in[2] == 1 and as_int(s_out[2]) > 1:
                inner = src
                if G.opname(inner) in ("unsqueeze",) and G.arg(inner, 1, "dim") in (2, -3):
                    return inner.args[0]
                if G.opname(inner) in ("slice", "view", "reshape") and G.shape(inner.args[0]) is not None and len(G.shape(inner.args[0])) == 4:
                    return inner.args[0]
    return None


def _count_heads(node: fx.Node, batch: tuple, head_dim: int) -> int:
    """Number of heads: the head batch dim when visible, else the width of the projection / head dim."""
    if len(batch) >= 2:
        return as_int(G.prod(batch[1:]))
    x = node
    for _ in range(12):
        s = G.shape(x)
        if s is None:
            break
        if s[-1] != head_dim and as_int(s[-1]) % head_dim == 0:
            return as_int(s[-1]) // head_dim
        name = G.opname(x)
        if name in G.VIEW_OPS | G.CAST_OPS | {"transpose", "permute", "mul", "div", "select", "getitem"}:
            x = x.args[0]
        else:
            break
    return as_int(batch[-1]) if batch else 1


def _projection_sources(ctx: GraphContext, node: fx.Node, limit: int = 400) -> set:
    """The activations that feed the first projections (linear/matmul with a weight) above ``node``."""
    out: set = set()
    seen: set = set()
    stack = [node]
    acts = ctx.activations
    while stack and len(seen) < limit:
        x = stack.pop()
        if x in seen or not isinstance(x, fx.Node):
            continue
        seen.add(x)
        if x.op == "placeholder":
            if x in acts:
                out.add(x)
            continue
        name = G.opname(x)
        if name in G.PROJECTION_OPS:
            ins = [i for i in x.all_input_nodes if i in acts]
            weights = [i for i in x.all_input_nodes if i not in acts]
            if weights and ins:
                out.update(ins)
                continue
        if name in G.SOFTMAX_OPS | G.SDPA_OPS:
            out.add(x)
            continue
        stack.extend(i for i in x.all_input_nodes if i in acts)
    return out


# ----------------------------------------------------------------------------- matching


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
) -> Match:
    cq, ck, cv = _canon(q), _canon(k), _canon(v)
    p_len, head_dim = cq[-2:]
    m_len, v_head_dim = ck[-2], cv[-1]
    analysis = analyse_masks(ctx, masks, p_len, m_len, sdpa_causal, score_dtype)
    kv_src = _repeat_kv_source(k.node) if not k.steps else None
    vv_src = _repeat_kv_source(v.node) if not v.steps else None
    heads = _count_heads(q.node, batch, as_int(head_dim))
    kv_heads = heads
    if kv_src is not None:
        kv_heads = as_int(G.shape(kv_src)[1])
    else:
        kb = ck[:-2]
        if len(batch) >= 2 and len(kb) == len(batch) and 0 < as_int(kb[-1]) < as_int(batch[-1]):
            kv_heads = as_int(kb[-1])  # broadcast (MQA) or enable_gqa heads
    q_src = _projection_sources(ctx, q.node)
    k_src = _projection_sources(ctx, k.node)
    is_cross = q_src.isdisjoint(k_src)
    site = AttentionSite(
        name=G.module_path(name_node),
        index=index,
        spelling=spelling,
        causal=analysis.causal,
        mask_kind=analysis.kind,
        is_cross=is_cross,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=as_int(head_dim),
        v_head_dim=as_int(v_head_dim),
        q_len=as_int(p_len),
        kv_len=as_int(m_len),
        # Flattened [B*H, ...] layouts (bmm) carry the batch inside the first dim.
        batch=as_int(batch[0]) if len(batch) >= 2 else max(1, as_int(G.prod(batch)) // max(1, heads)),
        scale=scale,
        rewritable=analysis.reason == "",
        reason=analysis.reason,
        notes=tuple(notes),
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
        gqa_source=kv_src if (kv_src is not None and vv_src is not None) else None,
        v_gqa_source=vv_src if (kv_src is not None and vv_src is not None) else None,
        nodes=nodes,
    )


def _steps_shape(shape: tuple, steps: list[Step]) -> tuple:
    s = list(shape)
    for st in steps:
        if st[0] == "permute":
            s = [s[p] for p in st[1]]
        elif st[0] == "transpose":
            s[-1], s[-2] = s[-2], s[-1]
        elif st[0] == "unsqueeze":
            s.insert(st[1], 1)
        elif st[0] == "reshape":
            s = list(st[1])
    return tuple(s)


def _canon(op: Operand) -> tuple:
    return _steps_shape(G.shape(op.node), op.steps)


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


def softmax_input(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(input, dim) if ``node`` computes a softmax: an ATen softmax op or its exp / sum decomposition."""
    name = G.opname(node)
    if name in G.SOFTMAX_OPS:
        return node.args[0], G.arg(node, 1, "dim")
    if name != "div" or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    e, total = node.args[0], node.args[1]
    if G.opname(e) != "exp" or G.opname(total) != "sum" or total.args[0] is not e:
        return None
    sub = e.args[0]
    if G.opname(sub) != "sub" or not isinstance(sub.args[1], fx.Node) or G.opname(sub.args[1]) != "amax":
        return None
    x, amax = sub.args[0], sub.args[1]
    if amax.args[0] is not x:
        return None
    dims = list(G.arg(total, 1, "dim", [])) or [None]
    if len(dims) != 1 or list(G.arg(amax, 1, "dim", [])) != dims:
        return None
    return x, dims[0]


def _match_explicit(ctx: GraphContext, sm: fx.Node, index: int) -> Match:
    s_in = G.shape(sm)
    x_in, dim = softmax_input(sm)
    if s_in is None or len(s_in) < 2 or dim is None or dim % len(s_in) != len(s_in) - 1:
        raise NotAttention("softmax is not over the last dimension")
    c1, ops, chain = _walk_scores(ctx, x_in)
    c2, probs, post, notes = _walk_probs(sm)
    if c2 is None:
        raise NotAttention("softmax is not followed by a product")
    q, k = _score_operands(c1)
    if k.node not in ctx.activations:
        raise NotAttention("keys are weights, not activations (classifier or router)")
    batch = tuple(G.shape(x_in)[:-2])
    sp = G.shape(probs)
    if sp is None or not G.same_sizes(sp[-2:], s_in[-2:]):
        raise Unsupported("the probabilities are re-laid out before the value product")
    v, out_steps = _value_operand(c2, probs, len(G.shape(probs)) - 2)
    if v.node not in ctx.activations:
        raise NotAttention("values are weights, not activations (pooling over weights)")
    for node in chain:
        if node is not x_in and len(G.users(node)) > 1:
            raise Unsupported(f"an intermediate of the scores ({node.name}) is used outside the attention")
    scale = 1.0
    masks: list[MaskTerm] = []
    for op in ops:
        if isinstance(op, MaskTerm):
            masks.append(op)
        else:
            s = op[1]
            scale *= s
            for m in masks:
                if m.kind == "add":
                    m.factor *= s
                else:
                    m.fill *= s
    # A scale applied to q or k before the product is part of the attention's scale.
    for opnd in (q, k):
        while True:
            so = _scalar_operand(ctx, opnd.node)
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
        tuple([c1, *chain, sm, *post, c2]), sm, G.dtype(x_in),
    )


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
