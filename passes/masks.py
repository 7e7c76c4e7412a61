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
from dataclasses import dataclass, field
from typing import Any, Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from passes import graph as G

logger = logging.getLogger(__name__)

# Fills that make a masked score vanish exactly, the way -inf does, for ordinary rows.
_HUGE_NEGATIVE = -1e30


def evaluate(ctx, node: fx.Node, at: Optional[dict] = None) -> Optional[torch.Tensor]:
    """Compute a node that does not depend on user inputs, or None if it cannot be computed here.

    In a capture with symbolic lengths, ``at`` binds each length symbol to a value: the node is then
    computed as it would be at those lengths (None without ``at``: a dynamic mask has no single value).
    """
    if ctx.dynamic and at is None:
        return None
    key = node if at is None else (node, tuple(sorted((str(k), v) for k, v in at.items())))
    if key not in ctx.evaluated:  # layers share one mask: compute it once
        ctx.evaluated[key] = _evaluate(ctx, node, at)
    return ctx.evaluated[key]


def _sym_value(v: Any, at: dict) -> Any:
    """The value of a symbolic size with its symbols bound by ``at`` (None when one stays free)."""
    expr = sympy.sympify(v.node.expr.xreplace({k: sympy.Integer(x) for k, x in at.items()}))
    if expr.free_symbols:
        return None
    return bool(expr) if isinstance(v, torch.SymBool) else (float(expr) if isinstance(v, torch.SymFloat) else int(expr))


def _evaluate(ctx, node: fx.Node, at: Optional[dict] = None) -> Optional[torch.Tensor]:
    v = G.val(node)
    if isinstance(v, torch.Tensor) and v.device.type == "meta":
        return None  # a meta-device model: nothing to compute with
    # What the node is computed from: constants, and (with ``at``) sizes, each a leaf bound to its value.
    leaves: dict[fx.Node, Any] = {}
    anc: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in anc or n in leaves:
            continue
        nv = G.val(n)
        if at is not None and isinstance(nv, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            leaves[n] = _sym_value(nv, at)
            if leaves[n] is None:
                return None
            continue
        anc.add(n)
        stack.extend(n.all_input_nodes)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    values: list[Any] = []
    for n in ctx.graph.nodes:
        if n in leaves:
            env[n] = sub.placeholder(n.name)
            values.append(leaves[n])
        elif n not in anc:
            continue
        elif n.op in ("placeholder", "get_attr"):
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


def length_bindings(*sizes: Any, count: int = 3) -> Optional[list[dict]]:
    """Bindings of the length symbols in ``sizes`` to ``count`` lengths a dynamic mask is classified at.

    The example's own lengths first, then longer odd ones inside each symbol's range (a band narrower
    than the example stays a band; a mask that changes its kind with the length shows it). None when
    the sizes are static, or a symbol has no example value or range to draw from.
    """
    syms = {}
    for x in sizes:
        if not isinstance(x, torch.SymInt):
            continue
        env = x.node.shape_env
        for s in x.node.expr.free_symbols:
            hint = getattr(env, "backed_var_to_val", None) or env.var_to_val
            if s not in hint:
                return None
            rng = env.var_to_range.get(s)
            h = int(hint[s])
            hi = int(rng.upper) if rng is not None and rng.upper.is_finite else 4 * h + 7
            syms[s] = sorted({min(hi, n) for n in (h, h + 5, 2 * h + 3)})
    if not syms:
        return None
    n = max(len(v) for v in syms.values())
    return [{s: v[min(i, len(v) - 1)] for s, v in syms.items()} for i in range(min(n, count))]


_LOGICAL = frozenset({"__and__", "bitwise_and", "logical_and", "mul", "add", "minimum", "__or__", "bitwise_or",
                      "logical_or"})
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
MASKED_BELOW = -1e4


@dataclass(frozen=True)
class StaticTerm:
    """What a mask term that does not depend on the inputs looks like once computed."""

    pattern: str  # none | causal_tl | causal_br | band_causal | band | other | varies
    bias: bool  # finite non-zero values at visible positions (ALiBi, T5 position bias)
    window: Optional[int] = None  # for band patterns: keys visible when |i - j| < window
    fully_hidden: bool = True  # some query row sees no key at all (conservative when unknown)


def inspect_static(value: torch.Tensor, kind: str, p_len: int, m_len: int) -> StaticTerm:
    """Visibility pattern and bias of a computed mask term broadcast to [..., P, M]."""
    if value.numel() == 1:  # a scalar fill (the 0 or finfo.min of a where), not a pattern
        return StaticTerm("none", False, fully_hidden=False)
    if value.dim() < 2 or value.shape[-2] not in (1, p_len) or value.shape[-1] not in (1, m_len):
        return StaticTerm("varies", False)
    if value.dtype == torch.bool:
        keep, bias = value, False
    else:
        v = value.float()
        keep = v > MASKED_BELOW
        bias = bool(((v != 0) & keep).any())
    if kind == "drop":
        keep = ~keep
    keep = keep.expand(*keep.shape[:-2], p_len, m_len).reshape(-1, p_len, m_len)
    fully = bool((~keep.any(-1)).any())
    if not bool((keep == keep[:1]).all()):
        return StaticTerm("varies", bias, fully_hidden=fully)
    pattern, window = _classify(keep[0])
    return StaticTerm(pattern, bias, window, fully)


def _classify(keep: torch.Tensor) -> tuple[str, Optional[int]]:
    """(pattern, window) of one [P, M] visibility matrix; bands are recognised by their values."""
    p_len, m_len = keep.shape
    ones = torch.ones(p_len, m_len, dtype=torch.bool)
    if bool(keep.all()):
        return "none", None
    if torch.equal(keep, ones.tril()):
        return "causal_tl", None
    if torch.equal(keep, ones.tril(m_len - p_len)):
        return "causal_br", None
    if not bool(keep.any()):
        return "other", None
    for offset in sorted({0, m_len - p_len}):
        d = torch.arange(p_len)[:, None] + offset - torch.arange(m_len)[None, :]  # query pos - key pos
        w = int(d[keep].max()) + 1 if bool((d[keep] >= 0).all()) else 0
        if w > 0 and torch.equal(keep, (d >= 0) & (d < w)):
            return "band_causal", w
        w = int(d.abs()[keep].max()) + 1
        if torch.equal(keep, d.abs() < w):
            return "band", w
    return "other", None


def _structurally_causal(ctx, node: fx.Node) -> bool:
    """A static mask built from tril/triu or from comparing two index ranges (when it can't be evaluated)."""
    anc = nx.ancestors(ctx.dg, node) | {node}
    names = {G.opname(n) for n in anc}
    if names & {"tril", "triu"}:
        return True
    return bool(names & {"le", "lt", "ge", "gt"}) and "arange" in names


# Ops a padding mask is built with from the caller's 0/1 mask: comparisons, logic, casts, views,
# and arithmetic by constants. Anything else (cumsum positions, slopes tensors) makes a bias.
_PADDING_OPS = G.CAST_OPS | G.VIEW_OPS | frozenset({
    "logical_not", "bitwise_not", "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__", "bitwise_and",
    "bitwise_or", "logical_and", "logical_or", "rsub", "sub", "add", "mul", "div", "where", "masked_fill", "neg",
    "slice", "select", "permute", "transpose", "full_like", "zeros_like", "ones_like", "clamp", "scalar_tensor",
    "index", "getitem", "min", "max", "minimum", "maximum", "fill", "full", "any", "all", "prod", "amin",
    "empty_like", "new_zeros", "new_ones", "new_full", "copy",
})


def padding_like(ctx, node: fx.Node) -> bool:
    """True when a dynamic mask term only hides keys (built from the input mask by logic and constants)."""
    seen: set = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or n not in ctx.activations or n.op == "placeholder":
            continue
        seen.add(n)
        if G.opname(n).rstrip("_") not in _PADDING_OPS:  # in-place forms (masked_fill_) count too
            return False
        for a in n.all_input_nodes:
            if a not in ctx.activations:
                t = ctx.constants.get(a.name) if a.op == "placeholder" else None
                s = G.shape(a)
                if (t is not None and t.numel() > 1) or (t is None and s is not None and G.prod(s) != 1
                                                         and G.opname(a) not in ("full", "scalar_tensor")):
                    return False  # a tensor of positions or slopes: a bias, not padding
            stack.append(a)
    return True


@dataclass(frozen=True)
class MaskAnalysis:
    """The meaning of a site's masks and how the rewrite should pass them on."""

    causal: bool  # queries never see later keys
    kind: str  # none | causal | padding | bool | additive
    pass_mask: bool  # the rewritten op needs the mask tensor
    op_causal: bool  # the rewritten op should apply top-left causal masking itself
    reason: str = ""  # non-empty when the masks cannot be rewritten exactly
    window: Optional[int] = None  # the site's own mask is a band: keys with |i - j| < window
    band_terms: tuple[int, ...] = ()  # indices of whole mask terms that make up the causal/band pattern
    band_separable: bool = True  # False when the band is fused with other masking inside one term
    fill: Optional[float] = None  # score of a position the bool mask hides (None: -inf)
    as_bool: bool = True  # the terms combine into one bool mask (else one float mask, added)
    has_bias: bool = False  # a float term adds values at visible positions (ALiBi, relative position bias)


def is_exact_fill(fill: float, dtype: Optional[torch.dtype]) -> bool:
    """True when filling a score with ``fill`` removes it exactly as -inf would (ordinary rows)."""
    if fill == -math.inf or fill <= _HUGE_NEGATIVE:
        return True
    if dtype is not None and dtype.is_floating_point:
        return fill <= torch.finfo(dtype).min
    return False


def analyse_masks(
    ctx, masks: list, p_len, m_len, sdpa_causal: bool, score_dtype: Optional[torch.dtype]
) -> MaskAnalysis:
    """Classify a site's mask terms and decide what the rewritten op must be given."""
    # Inside a compiler a fake mode is active; static masks are computed and inspected for real.
    symbolic = not (_concrete(p_len) and _concrete(m_len))
    was = ctx.dynamic
    # A length that depends on the data (a per-sample slice by a .item() length) has no value to
    # compute a mask at: the masks are read from the graph alone, as for a dynamic capture.
    ctx.dynamic = was or symbolic
    try:
        with unset_fake_temporarily():
            return _analyse_masks(ctx, masks, p_len, m_len, sdpa_causal, score_dtype)
    finally:
        ctx.dynamic = was


def _concrete(x: Any) -> bool:
    """True for a size with a value here (an int, or a symbolic size with a hint)."""
    if isinstance(x, torch.SymInt):
        return x.node.hint is not None
    return isinstance(x, int)


@dataclass
class _Acc:
    """What the terms said so far (mutable while walking them)."""

    causal: bool
    kinds: set = field(default_factory=set)
    window: Optional[int] = None
    bias: bool = False
    band_terms: list = field(default_factory=list)
    fused_band: bool = False
    may_fully_hide: bool = False
    unexplained: bool = False


def _static(acc: _Acc, st: StaticTerm, is_float: bool) -> bool:
    """Fold one computed term into ``acc``; True when it is a pure causal/band pattern."""
    acc.causal = acc.causal or st.pattern in ("causal_tl", "causal_br", "band_causal")
    if st.window is not None and acc.window is None:
        acc.window = st.window
    if st.bias:
        acc.bias = True
        acc.kinds.add("additive")
    if st.pattern in ("other", "varies"):
        acc.kinds.add("additive" if st.bias or is_float else "bool")
    if st.pattern == "band":
        acc.kinds.add("bool")
    return not st.bias and st.pattern in ("causal_tl", "causal_br", "band_causal", "band")


def _inspect(ctx, node: fx.Node, kind: str, p_len, m_len,
             bindings: Optional[list[dict]]) -> Optional[tuple[StaticTerm, bool]]:
    """(pattern, is_float) of a mask term that does not depend on the data, or None when it cannot be
    computed. With ``bindings`` (symbolic lengths) it is computed at each; a term whose pattern changes
    with the length (not a causal or band pattern of the length itself) reads as varying."""
    if bindings is None:
        value = evaluate(ctx, node)
        if value is None:
            return None
        return inspect_static(value, kind, int(p_len), int(m_len)), value.dtype != torch.bool
    seen = set()
    for at in bindings:
        value = evaluate(ctx, node, at)
        p, m = (_sym_value(x, at) if isinstance(x, torch.SymInt) else int(x) for x in (p_len, m_len))
        if value is None or p is None or m is None:
            return None
        seen.add((inspect_static(value, kind, p, m), value.dtype != torch.bool))
    if len(seen) == 1:
        return seen.pop()
    return StaticTerm("varies", any(st.bias for st, _ in seen)), any(f for _, f in seen)


def _analyse_masks(ctx, masks, p_len, m_len, sdpa_causal, score_dtype) -> MaskAnalysis:
    # A capture with symbolic lengths: masks built from the length are computed at a few lengths
    # and must classify the same at each (None: read from the graph alone).
    # (exported programs only: a compiler's graph keeps reading them from the graph alone).
    bindings = length_bindings(p_len, m_len) if ctx.dynamic and ctx.shape_reads_are_lengths else None
    p_len, m_len = int(p_len) if not ctx.dynamic else p_len, int(m_len) if not ctx.dynamic else m_len
    if not masks:
        return MaskAnalysis(sdpa_causal, "causal" if sdpa_causal else "none", False, sdpa_causal)
    acc = _Acc(sdpa_causal)
    static_only = True
    for idx, m in enumerate(masks):
        hides = m.kind != "add"
        if m.node in ctx.activations:
            static_only = False
            acc.may_fully_hide |= hides
            for t in _terms(ctx, m.node):
                if t in ctx.activations:
                    s = G.shape(t)
                    key_only = s is not None and len(s) >= 2 and s[-2] == 1
                    is_bool = G.dtype(t) == torch.bool
                    if is_bool or padding_like(ctx, t):  # a bool term hides keys; it can never be a bias
                        acc.kinds.add("padding" if key_only else ("bool" if is_bool else "additive"))
                    else:
                        acc.kinds.add("bool" if is_bool else "additive")
                        acc.bias |= not is_bool and m.kind == "add"
                    continue
                got = _inspect(ctx, t, "keep", p_len, m_len, bindings)
                if got is None:
                    acc.causal = acc.causal or _structurally_causal(ctx, t)
                    continue
                st, is_float = got
                if _static(acc, st, is_float) and st.pattern != "causal_tl":
                    acc.fused_band |= st.window is not None
            continue
        got = _inspect(ctx, m.node, m.kind if hides else "keep", p_len, m_len, bindings)
        if got is None:
            acc.unexplained = True
            acc.may_fully_hide |= hides
            if _structurally_causal(ctx, m.node):
                acc.causal = True
            else:
                acc.kinds.add("bool" if G.dtype(m.node) == torch.bool else "additive")
            continue
        st, is_float = got
        acc.may_fully_hide |= hides and st.fully_hidden
        if _static(acc, st, is_float):
            acc.band_terms.append(idx)
        if st.bias or st.pattern not in ("none", "causal_tl"):
            acc.unexplained = True
    window = acc.window
    base = dict(window=window, band_terms=tuple(acc.band_terms), band_separable=not acc.fused_band,
                has_bias=acc.bias)
    hiding = all(m.kind == "add" or is_exact_fill(m.fill, score_dtype) for m in masks)
    if static_only and not acc.unexplained and hiding:
        # Every mask is a static causal (top-left) or all-visible pattern: the op applies it itself.
        return MaskAnalysis(acc.causal, "causal" if acc.causal else "none", False, acc.causal, **base)
    for k in ("additive", "bool", "padding"):
        if k in acc.kinds:
            kind = k
            break
    else:
        kind = "causal" if acc.causal else "bool"
    fill, as_bool, reason = _fill_semantics(masks, acc.may_fully_hide, score_dtype)
    return MaskAnalysis(acc.causal, kind, True, sdpa_causal, reason, fill=fill, as_bool=as_bool, **base)


def _fill_semantics(masks: list, may_fully_hide: bool, dtype) -> tuple[Optional[float], bool, str]:
    """(fill, as_bool, reason): how hidden positions score in the op so every row, even a fully
    masked one, comes out as the original computed it."""
    hide = [m for m in masks if m.kind != "add"]
    adds = [m for m in masks if m.kind == "add"]
    if not hide:
        return None, False, ""
    fills = {m.fill for m in hide}
    exact = all(is_exact_fill(f, dtype) for f in fills)
    if not adds:
        if exact and not may_fully_hide:
            return None, True, ""
        if len(fills) == 1:
            (f,) = fills
            return (None if f == -math.inf else f), True, ""
        return None, True, (f"the mask terms fill hidden scores with different values {sorted(fills)}; "
                            "rows they fully hide would change")
    if exact and (not may_fully_hide or len(fills) == 1):
        # One float mask: hidden positions get the fill on top of the scores; a fill this large
        # absorbs any score in rounding, so even fully hidden rows keep the original's values.
        f = next(iter(fills)) if len(fills) == 1 else -math.inf
        return f, False, ""
    return None, False, (f"a finite mask fill ({min(fills):g}) and an additive bias on the same scores: "
                         "rewriter::attention carries one of the two exactly, not both")
