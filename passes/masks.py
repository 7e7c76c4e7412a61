"""What the masks of an attention site mean: causal, padding, general bool or additive bias.

Masks that do not depend on the caller's inputs are evaluated once (they are functions of
shapes and buffers only), so a causal mask built any way at all (tril, triu, index
comparisons, a slice of a buffer) is recognised by its values, not its spelling. Masks that
depend on the inputs are split into terms (and / add / where); their static terms are
evaluated, their dynamic terms classified by shape (a key-only broadcast is padding).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from passes import graph as G

logger = logging.getLogger(__name__)

# Fills that make a masked score vanish exactly, the way -inf does, for ordinary rows.
_HUGE_NEGATIVE = -1e30


@dataclass(frozen=True)
class MaskAnalysis:
    """The meaning of a site's masks and how the rewrite should pass them on."""

    causal: bool  # queries never see later keys
    kind: str  # none | causal | padding | bool | additive
    pass_mask: bool  # the rewritten op needs the mask tensor
    op_causal: bool  # the rewritten op should apply top-left causal masking itself
    reason: str = ""  # non-empty when the masks cannot be rewritten exactly


def is_exact_fill(fill: float, dtype: Optional[torch.dtype]) -> bool:
    """True when filling a score with ``fill`` removes it exactly as -inf would (ordinary rows)."""
    if fill == -math.inf or fill <= _HUGE_NEGATIVE:
        return True
    if dtype is not None and dtype.is_floating_point:
        return fill <= torch.finfo(dtype).min
    return False


def evaluate(ctx, node: fx.Node) -> Optional[torch.Tensor]:
    """Compute a node that does not depend on user inputs, or None if it cannot be computed here."""
    if ctx.dynamic:
        return None
    if node not in ctx.evaluated:  # layers share one mask: compute it once
        ctx.evaluated[node] = _evaluate(ctx, node)
    return ctx.evaluated[node]


def _evaluate(ctx, node: fx.Node) -> Optional[torch.Tensor]:
    v = G.val(node)
    if isinstance(v, torch.Tensor) and v.device.type == "meta":
        return None  # a meta-device model: nothing to compute with
    anc = nx.ancestors(ctx.dg, node) | {node}
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    values: list[torch.Tensor] = []
    for n in ctx.graph.nodes:
        if n not in anc:
            continue
        if n.op in ("placeholder", "get_attr"):
            t = ctx.constants.get(n.name if n.op == "placeholder" else n.target)
            if t is None:
                return None
            env[n] = sub.placeholder(n.name)
            values.append(t)
        elif n.op == "call_function":
            env[n] = sub.node_copy(n, lambda x: env[x])
        else:
            return None
    sub.output(env[node])
    try:
        with torch.no_grad():
            out = fx.GraphModule(torch.nn.Module(), sub)(*values)
    except Exception as e:  # e.g. a meta-device model: nothing to compute with
        logger.debug("could not evaluate %s: %s", node.name, e)
        return None
    if not isinstance(out, torch.Tensor) or out.device.type == "meta":
        return None
    return out


_LOGICAL = frozenset({"__and__", "bitwise_and", "logical_and", "mul", "add", "minimum", "__or__", "bitwise_or", "logical_or"})
# Ops a term is looked through: they keep (or only broadcast) its shape, so a padding term found
# below them still shows its query dim of size 1. Reshapes stop the descent for that reason.
_TRANSPARENT = G.CAST_OPS | frozenset(
    {"logical_not", "bitwise_not", "neg", "expand", "clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
)


def _terms(ctx, node: Any, depth: int = 0) -> list[fx.Node]:
    """Split a mask expression into terms that are each static or each tied to the inputs."""
    if not isinstance(node, fx.Node):
        return []
    if node not in ctx.activations or depth > 30:
        return [node]
    name = G.opname(node)
    if name in _LOGICAL:
        return [t for a in node.args[:2] for t in _terms(ctx, a, depth + 1)]
    if name == "where":
        return [t for a in node.args[:3] for t in _terms(ctx, a, depth + 1)]
    if name in _TRANSPARENT:
        return _terms(ctx, node.args[0], depth + 1)
    return [node]


# For classifying a static mask only (the mask itself is passed on unchanged): a score pushed this
# low contributes exp(-1e4) = 0, so -10000-style masks (old BERT) count as masked too.
_MASKED_BELOW = -1e4


@dataclass(frozen=True)
class StaticTerm:
    """What a mask term that does not depend on the inputs looks like once computed."""

    pattern: str  # none | causal_tl | causal_br | other | varies (differs over batch/heads, or unknown shape)
    bias: bool  # finite non-zero values at visible positions (ALiBi, T5 position bias)


def inspect_static(value: torch.Tensor, kind: str, p_len: int, m_len: int) -> StaticTerm:
    """Visibility pattern and bias of a computed mask term broadcast to [..., P, M]."""
    if value.numel() == 1:  # a scalar fill (the 0 or finfo.min of a where), not a pattern
        return StaticTerm("none", False)
    if value.dim() < 2 or value.shape[-2] not in (1, p_len) or value.shape[-1] not in (1, m_len):
        return StaticTerm("varies", False)
    if value.dtype == torch.bool:
        keep, bias = value, False
    else:
        v = value.float()
        keep = v > _MASKED_BELOW
        bias = bool(((v != 0) & keep).any())
    if kind == "drop":
        keep = ~keep
    keep = keep.expand(*keep.shape[:-2], p_len, m_len).reshape(-1, p_len, m_len)
    if not bool((keep == keep[:1]).all()):
        return StaticTerm("varies", bias)
    return StaticTerm(_classify(keep[0]), bias)


def _classify(keep: torch.Tensor) -> str:
    p_len, m_len = keep.shape
    ones = torch.ones(p_len, m_len, dtype=torch.bool)
    if bool(keep.all()):
        return "none"
    if torch.equal(keep, ones.tril()):
        return "causal_tl"
    if torch.equal(keep, ones.tril(m_len - p_len)):
        return "causal_br"
    return "other"


def _structurally_causal(ctx, node: fx.Node) -> bool:
    """A static mask built from tril/triu or from comparing two index ranges (when it can't be evaluated)."""
    anc = nx.ancestors(ctx.dg, node) | {node}
    names = {G.opname(n) for n in anc}
    if names & {"tril", "triu"}:
        return True
    return bool(names & {"le", "lt", "ge", "gt"}) and "arange" in names


def analyse_masks(
    ctx, masks: list, p_len, m_len, sdpa_causal: bool, score_dtype: Optional[torch.dtype]
) -> MaskAnalysis:
    """Classify a site's mask terms and decide what the rewritten op must be given."""
    # Inside a compiler a fake mode is active; static masks are computed and inspected for real.
    with unset_fake_temporarily():
        return _analyse_masks(ctx, masks, p_len, m_len, sdpa_causal, score_dtype)


def _analyse_masks(ctx, masks, p_len, m_len, sdpa_causal, score_dtype) -> MaskAnalysis:
    p_len, m_len = int(p_len) if not ctx.dynamic else p_len, int(m_len) if not ctx.dynamic else m_len
    for m in masks:
        if m.kind != "add" and not is_exact_fill(m.fill, score_dtype):
            return MaskAnalysis(False, "bool", True, False,
                                f"the mask fills scores with the finite value {m.fill:g}; a rewrite would change "
                                "fully masked rows")
    if not masks:
        return MaskAnalysis(sdpa_causal, "causal" if sdpa_causal else "none", False, sdpa_causal)
    causal = sdpa_causal
    static_only = True
    kinds: set[str] = set()
    unexplained = False
    for m in masks:
        if m.node in ctx.activations:
            static_only = False
            for t in _terms(ctx, m.node):
                if t in ctx.activations:
                    s = G.shape(t)
                    kinds.add("padding" if s is not None and len(s) >= 2 and s[-2] == 1 else
                              ("bool" if G.dtype(t) == torch.bool else "additive"))
                    continue
                value = evaluate(ctx, t)
                if value is None:
                    causal = causal or _structurally_causal(ctx, t)
                    continue
                st = inspect_static(value, "keep", p_len, m_len)
                causal = causal or st.pattern.startswith("causal")
                if st.bias or st.pattern in ("other", "varies"):
                    kinds.add("additive" if st.bias or value.dtype != torch.bool else "bool")
            continue
        value = evaluate(ctx, m.node)
        if value is None:
            unexplained = True
            if _structurally_causal(ctx, m.node):
                causal = True
            else:
                kinds.add("bool" if G.dtype(m.node) == torch.bool else "additive")
            continue
        st = inspect_static(value, m.kind if m.kind != "add" else "keep", p_len, m_len)
        causal = causal or st.pattern.startswith("causal")
        if st.bias:
            unexplained = True
            kinds.add("additive")
        if st.pattern in ("causal_br", "other", "varies"):
            unexplained = True
            if st.pattern != "causal_br":
                kinds.add("bool" if value.dtype == torch.bool else "additive")
    if static_only and not unexplained:
        # Every mask is a static causal (top-left) or all-visible pattern: the op applies it itself.
        return MaskAnalysis(causal, "causal" if causal else "none", False, causal)
    for k in ("additive", "bool", "padding"):
        if k in kinds:
            kind = k
            break
    else:
        kind = "causal" if causal else "bool"
    return MaskAnalysis(causal, kind, True, sdpa_causal)
