"""Attention cascades: the IR helpers variants build theirs from, exact attention's forms, and the registry.

Every builder takes keyword parameters (numbers or sympy expressions; symbols by default)
and two execution choices: ``form`` (the softmax algorithm: ``online`` one pass, ``2pass``,
``3pass``) and ``schedule`` (``fused``: one kernel per cascade, as a Triton kernel runs it;
``eager``: one kernel per library call, as the plain-PyTorch implementation runs it).
Query heads are split as h = (g, r) with R = H/G query heads per KV head, so GQA is G < H.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
from typing import Callable

import sympy

from .ir import Access, B, Cascade, E, Einsum, F, G, H, Kernel, M, P, Predicate

logger = logging.getLogger(__name__)

FORMS = ("online", "2pass", "3pass")
SCHEDULES = ("fused", "eager")


def size(x: object) -> sympy.Expr:
    return sympy.sympify(x)


def base_sizes() -> list[tuple[str, sympy.Expr]]:
    return [("b", B), ("g", G), ("r", H / G), ("p", P), ("m", M), ("e", E), ("f", F)]


def core(
    q: Access,
    k: Access,
    v: Access,
    *,
    key: str,
    qranks: tuple[str, ...],
    form: str,
    out: str = "AV",
    mask: Access | None = None,
    predicate: Predicate | None = None,
    prefix: str = "",
    fdim: str = "f",
    mask_ops: tuple[str, ...] = ("add",),
) -> tuple[list[Einsum], list[tuple[str, tuple[str, ...]]], list[str], list[list[str]]]:
    """Scores, softmax and value reduction over ``key`` in the requested form.

    Returns the Einsums, rank splits, iterative ranks and the eager kernel grouping
    (one group per library call: a matmul, the mask, ``softmax``, a matmul).
    """
    if form not in FORMS:
        raise ValueError(f"unknown softmax form {form!r}; expected one of {FORMS}")
    n = prefix
    pr = predicate

    def acc(t: str, ranks: tuple[str, ...]) -> Access:
        return Access(n + t, ranks)

    if form == "online":
        k1, k0 = key + "1", key + "0"

        def tile(a: Access) -> Access:
            idx: list[str] = []
            for i in a.indices:
                idx.extend([k1, k0] if i == key else [i])
            return Access(a.tensor, tuple(idx))

        kt, vt = tile(k), tile(v)
        s = qranks + (k1, k0)
        ops: list[Einsum] = [Einsum(acc("BQK", s), (q, kt), ("mul",), ("e",) if "e" in q.ranks else (q.ranks[-1],),
                                    "sum", pr)]
        score = acc("BQK", s)
        if mask is not None:
            ops.append(Einsum(acc("BSM", s), (score, tile(mask)), mask_ops, (), None, pr))
            score = acc("BSM", s)
        row = qranks
        cur, nxt, fin = (k1,), (k1 + "+1",), (k1.upper(),)
        vo = qranks + (fdim,)
        ops += [
            Einsum(acc("LM", row + cur), (score,), (), (k0,), "max", pr),
            Einsum(acc("RM", row + nxt), (acc("RM", row + cur), acc("LM", row + cur)), ("max",), (), None, pr),
            Einsum(acc("SLN", s), (score, acc("RM", row + nxt)), ("sub", "exp"), (), None, pr),
            Einsum(acc("SLD", row + cur), (acc("SLN", s),), (), (k0,), "sum", pr),
            Einsum(acc("SLNV", row + cur + (fdim,)), (acc("SLN", s), vt), ("mul",), (k0,), "sum", pr),
            Einsum(acc("PRM", row + cur), (acc("RM", row + cur), acc("RM", row + nxt)), ("sub", "exp"), (), None, pr),
            Einsum(acc("SPD", row + cur), (acc("RD", row + cur), acc("PRM", row + cur)), ("mul",), (), None, pr),
            Einsum(acc("RD", row + nxt), (acc("SLD", row + cur), acc("SPD", row + cur)), ("add",), (), None, pr),
            Einsum(acc("SPNV", row + cur + (fdim,)), (acc("RNV", row + cur + (fdim,)), acc("PRM", row + cur)),
                   ("mul",), (), None, pr),
            Einsum(acc("RNV", row + nxt + (fdim,)), (acc("SLNV", row + cur + (fdim,)),
                                                     acc("SPNV", row + cur + (fdim,))),
                   ("add",), (), None, pr),
            Einsum(Access(out, vo), (acc("RNV", row + fin + (fdim,)), acc("RD", row + fin)), ("div",)),
        ]
        groups = [[e.name for e in ops]]
        return ops, [(key, (k1, k0))], [k1], groups

    s = qranks + (key,)
    qk_red = tuple(r for r in q.ranks if r not in s)
    ops = [Einsum(acc("QK", s), (q, k), ("mul",), qk_red, "sum", pr)]
    groups = [[n + "QK"]]
    score = acc("QK", s)
    if mask is not None:
        ops.append(Einsum(acc("SM", s), (score, mask), mask_ops, (), None, pr))
        groups.append([n + "SM"])
        score = acc("SM", s)
    ops += [
        Einsum(acc("GM", qranks), (score,), (), (key,), "max", pr),
        Einsum(acc("SN", s), (score, acc("GM", qranks)), ("sub", "exp"), (), None, pr),
        Einsum(acc("SD", qranks), (acc("SN", s),), (), (key,), "sum", pr),
    ]
    soft = [n + "GM", n + "SN", n + "SD"]
    vo = qranks + (fdim,)
    if form == "3pass":
        ops += [
            Einsum(acc("A", s), (acc("SN", s), acc("SD", qranks)), ("div",), (), None, pr),
            Einsum(Access(out, vo), (acc("A", s), v), ("mul",), (key,), "sum", pr),
        ]
        groups += [soft + [n + "A"], [out]]
    else:
        ops += [
            Einsum(acc("SNV", vo), (acc("SN", s), v), ("mul",), (key,), "sum", pr),
            Einsum(Access(out, vo), (acc("SNV", vo), acc("SD", qranks)), ("div",)),
        ]
        groups += [soft, [n + "SNV"], [out]]
    return ops, [], [], groups


def finish(name: str, ops: list[Einsum], sizes: list[tuple[str, sympy.Expr]], inputs: tuple[str, ...],
            splits: list, iterative: list, groups: list[list[str]] | None, schedule: str, *,
            key: str = "m", derived: tuple[str, ...] = (), fused_groups: set[int] | None = None,
            tile_ranks: tuple[str, ...] = (), query: str = "p",
            tile_q: object = 64, tile_k: object = 64, notes: str = "",
            params: dict[str, object] | None = None, outputs: tuple[str, ...] = ("AV",)) -> Cascade:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    sizes = list(sizes)
    for whole, pieces in splits:
        if pieces[0] in dict(sizes):
            continue  # the builder sized this split itself
        whole_size = dict(sizes)[whole]
        t = size(tile_k)
        sizes += [(pieces[0], whole_size / t), (pieces[1], t)]
    kernels = None
    if schedule == "eager" and groups is not None:
        fused_groups = fused_groups or set()
        kernels = tuple(Kernel(f"k{i}:{g[0]}", tuple(g), fused=i in fused_groups) for i, g in enumerate(groups))
    used = {r for e in ops for r in e.space} | {r for e in ops for a in e.inputs for r in a.ranks}
    sizes = [(r, sz) for r, sz in sizes if r in used]
    return Cascade(
        name=name, einsums=tuple(ops), sizes=tuple(sizes), inputs=inputs, outputs=outputs, key=key,
        splits=tuple(splits), iterative=tuple(iterative), kernels=kernels, tile_q=size(tile_q),
        tile_k=size(tile_k), notes=notes, derived_keys=derived, tile_ranks=tile_ranks, query=query,
        params=tuple((k, size(v)) for k, v in (params or {}).items()),
    )


def qkv() -> tuple[Access, Access, Access]:
    return (Access("Q", ("b", "g", "r", "p", "e")), Access("K", ("b", "g", "m", "e")),
            Access("V", ("b", "g", "m", "f")))


def dense(*, causal: bool = False, form: str = "online", schedule: str = "fused", tile_q: object = 64,
          tile_k: object = 64, name: str = "attention") -> Cascade:
    """Exact softmax attention (default: 1-pass online softmax over key tiles, FlashAttention-2)."""
    q, k, v = qkv()
    # a fused kernel skips key tiles the causal mask hides; a library matmul computes them all
    skip = schedule == "fused" or form == "online"
    pred = Predicate("causal", causal=True, skip=skip, tile_q=size(tile_q), tile_k=size(tile_k)) if causal else None
    ops, splits, it, groups = core(q, k, v, key="m", qranks=("b", "g", "r", "p"), form=form, predicate=pred)
    if form == "online":
        groups = None  # online softmax is one fused kernel in either schedule (SDPA on CPU)
    notes = {"online": "1-pass online softmax", "2pass": "2-pass, divide deferred",
             "3pass": "naive 3-pass softmax"}[form]
    return finish(name, ops, base_sizes(), ("Q", "K", "V"), splits, it, groups, schedule,
                   tile_q=tile_q, tile_k=tile_k, notes=notes + (", causal" if causal else ""))


def dense_3pass(**kw: object) -> Cascade:
    """Naive softmax attention: max, then exp-sum, then normalise and reduce V."""
    kw.setdefault("form", "3pass")
    kw.setdefault("name", "dense_3pass")
    return dense(**kw)  # type: ignore[arg-type]


def dense_2pass(**kw: object) -> Cascade:
    """Softmax attention with the divide deferred after the value reduction."""
    kw.setdefault("form", "2pass")
    kw.setdefault("name", "dense_2pass")
    return dense(**kw)  # type: ignore[arg-type]


def gqa(**kw: object) -> Cascade:
    """Grouped-query attention: dense with G < H KV heads (H/G query heads share one)."""
    kw.setdefault("name", "gqa")
    return dense(**kw)  # type: ignore[arg-type]


def decode(**kw: object) -> Cascade:
    """One-token decode: dense attention with P = 1 (the query sees every cached key)."""
    kw.setdefault("name", "decode")
    c = dense(**kw)  # type: ignore[arg-type]
    sizes = tuple((r, (sympy.Integer(1) if r == "p" else s)) for r, s in c.sizes)
    return c.replace(sizes=sizes, notes=c.notes + ", P=1", tile_q=sympy.Integer(1))


def local_span(name: str, *, causal: bool, window: sympy.Expr, sinks: sympy.Expr, block: sympy.Expr,
           form: str, schedule: str, tile_k: object, gather: bool, params: dict[str, object],
           notes: str) -> Cascade:
    """Attention over a block-local key rank w: each query block of ``block`` rows sees a
    contiguous span of keys (plus the sinks), computed in full and masked."""
    q = Access("Q", ("b", "g", "r", "p1", "p0", "e"))
    span = block + window - 1 if causal else block + 2 * window - 2
    wsize = span + sinks
    sizes = [("b", B), ("g", G), ("r", H / G), ("p1", P / block), ("p0", block), ("w", wsize),
             ("e", E), ("f", F), ("m", M)]
    pre: list[Einsum] = []
    groups_pre: list[list[str]] = []
    if gather:
        # the keys of each query block are copied together (sinks concatenated, spans made
        # contiguous for the matmul)
        pre = [Einsum(Access("KW", ("b", "g", "p1", "w", "e")), (Access("K", ("b", "g", "p1", "w", "e")),), ("copy",)),
               Einsum(Access("VW", ("b", "g", "p1", "w", "f")), (Access("V", ("b", "g", "p1", "w", "f")),), ("copy",))]
        groups_pre = [["KW"], ["VW"]]
        k, v = Access("KW", ("b", "g", "p1", "w", "e")), Access("VW", ("b", "g", "p1", "w", "f"))
    else:
        # overlapping strided views of K and V: each block reads its span
        k, v = Access("K", ("b", "g", "p1", "w", "e")), Access("V", ("b", "g", "p1", "w", "f"))
    mask = Access("MASK", ("p0", "w"))
    ops, splits, it, groups = core(q, k, v, key="w", qranks=("b", "g", "r", "p1", "p0"), form=form, mask=mask)
    ops = pre + ops
    fused = None
    if form == "online":
        groups = [[e.name for e in ops]]
        fused = {0}
    else:
        groups = groups_pre + groups
    return finish(name, ops, sizes, ("Q", "K", "V", "MASK"), splits, it, groups, schedule, key="w",
                   derived=("m",), fused_groups=fused, tile_ranks=("p0",), query="p1", tile_q=1, tile_k=tile_k,
                   notes=notes, params=params)


def softmax_form(form: str | None, schedule: str) -> str:
    """Default softmax form: online in a fused kernel, library softmax (3 passes over a row) eagerly."""
    return form or ("online" if schedule == "fused" else "3pass")


#: The cascades by name: the cost model's own forms of exact attention here, and every variant's, which
#: its module registers (``register``), found through the ``attention_rewriter.cascades`` entry points.
CASCADES: dict[str, Callable[..., Cascade]] = {"dense_2pass": dense_2pass, "dense_3pass": dense_3pass, "gqa": gqa,
                                              "decode": decode}

#: Parameters each cascade takes (name -> python type), for the CLI and the planner.
PARAMS: dict[str, dict[str, type]] = {name: {} for name in CASCADES}

PLUGINS = "attention_rewriter.cascades"


def register(name: str, builder: Callable[..., Cascade], params: dict[str, type]) -> None:
    """Add a cascade (a variant's, built from this package's IR) under ``name`` with its typed parameters."""
    CASCADES[name] = builder
    PARAMS[name] = dict(params)


@functools.lru_cache(maxsize=1)
def load_plugins() -> None:
    """Load the installed packages that register cascades (entry point group ``attention_rewriter.cascades``)."""
    for ep in importlib.metadata.entry_points(group=PLUGINS):
        try:
            ep.load()()
        except Exception as e:  # a broken plug-in must not take the cost model's own cascades down with it
            logger.warning("cascade plug-in %s failed to load: %s: %s", ep.value, type(e).__name__, e)


def known() -> list[str]:
    """Every cascade name, plug-ins included."""
    load_plugins()
    return sorted(CASCADES)


def build(variant: str, *, causal: bool = False, form: str | None = None, schedule: str = "fused",
          tile_q: object = 64, tile_k: object = 64, **params: object) -> Cascade:
    """Build the named variant's cascade with the given parameters and execution choices."""
    if variant not in CASCADES:
        load_plugins()
    if variant not in CASCADES:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(known())}")
    allowed = PARAMS[variant]
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"variant {variant!r} takes no parameter(s) {sorted(unknown)}; "
                         f"it takes: {', '.join(allowed) or 'none'}")
    kw: dict[str, object] = dict(params)
    kw.update(causal=causal, schedule=schedule, tile_q=tile_q, tile_k=tile_k)
    if form is not None and variant not in ("dense_2pass", "dense_3pass"):
        kw["form"] = form
    c = CASCADES[variant](**kw)
    return c if c.name == variant else c.replace(name=variant)
