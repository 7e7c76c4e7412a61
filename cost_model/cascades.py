"""Catalogue of attention cascades: one builder per variant, keyed by variant name.

Every builder takes keyword parameters (numbers or sympy expressions; symbols by default)
and two execution choices: ``form`` (the softmax algorithm: ``online`` one pass, ``2pass``,
``3pass``) and ``schedule`` (``fused``: one kernel per cascade, as a Triton kernel runs it;
``eager``: one kernel per library call, as the plain-PyTorch implementation runs it).
Query heads are split as h = (g, r) with R = H/G query heads per KV head, so GQA is G < H.
"""
from __future__ import annotations

import logging
from typing import Callable

import sympy

from .ir import Access, B, Cascade, E, Einsum, F, G, H, Kernel, M, P, Predicate, sym

logger = logging.getLogger(__name__)

FORMS = ("online", "2pass", "3pass")
SCHEDULES = ("fused", "eager")


def _s(x: object) -> sympy.Expr:
    return sympy.sympify(x)


def _base_sizes() -> list[tuple[str, sympy.Expr]]:
    return [("b", B), ("g", G), ("r", H / G), ("p", P), ("m", M), ("e", E), ("f", F)]


def _core(
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
            Einsum(acc("RNV", row + nxt + (fdim,)), (acc("SLNV", row + cur + (fdim,)), acc("SPNV", row + cur + (fdim,))),
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


def _finish(name: str, ops: list[Einsum], sizes: list[tuple[str, sympy.Expr]], inputs: tuple[str, ...],
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
        t = _s(tile_k)
        sizes += [(pieces[0], whole_size / t), (pieces[1], t)]
    kernels = None
    if schedule == "eager" and groups is not None:
        fused_groups = fused_groups or set()
        kernels = tuple(Kernel(f"k{i}:{g[0]}", tuple(g), fused=i in fused_groups) for i, g in enumerate(groups))
    used = {r for e in ops for r in e.space} | {r for e in ops for a in e.inputs for r in a.ranks}
    sizes = [(r, sz) for r, sz in sizes if r in used]
    return Cascade(
        name=name, einsums=tuple(ops), sizes=tuple(sizes), inputs=inputs, outputs=outputs, key=key,
        splits=tuple(splits), iterative=tuple(iterative), kernels=kernels, tile_q=_s(tile_q),
        tile_k=_s(tile_k), notes=notes, derived_keys=derived, tile_ranks=tile_ranks, query=query,
        params=tuple((k, _s(v)) for k, v in (params or {}).items()),
    )


def _qkv() -> tuple[Access, Access, Access]:
    return (Access("Q", ("b", "g", "r", "p", "e")), Access("K", ("b", "g", "m", "e")),
            Access("V", ("b", "g", "m", "f")))


def dense(*, causal: bool = False, form: str = "online", schedule: str = "fused", tile_q: object = 64,
          tile_k: object = 64, name: str = "dense") -> Cascade:
    """Exact softmax attention (default: 1-pass online softmax over key tiles, FlashAttention-2)."""
    q, k, v = _qkv()
    # a fused kernel skips key tiles the causal mask hides; a library matmul computes them all
    skip = schedule == "fused" or form == "online"
    pred = Predicate("causal", causal=True, skip=skip, tile_q=_s(tile_q), tile_k=_s(tile_k)) if causal else None
    ops, splits, it, groups = _core(q, k, v, key="m", qranks=("b", "g", "r", "p"), form=form, predicate=pred)
    if form == "online":
        groups = None  # online softmax is one fused kernel in either schedule (SDPA on CPU)
    notes = {"online": "1-pass online softmax", "2pass": "2-pass, divide deferred",
             "3pass": "naive 3-pass softmax"}[form]
    return _finish(name, ops, _base_sizes(), ("Q", "K", "V"), splits, it, groups, schedule,
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


def gqa_merge(*, groups: object = None, **kw: object) -> Cascade:
    """KV-head merging (MHA -> GQA): dense attention with ``groups`` KV heads instead of G."""
    kw.setdefault("name", "gqa_merge")
    c = dense(**kw)  # type: ignore[arg-type]
    gm = _s(groups) if groups is not None else sym("Gm")
    sizes = tuple((r, s.subs(G, gm)) for r, s in c.sizes)
    return c.replace(sizes=sizes, params=(("groups", gm),), notes=c.notes + ", merged KV heads")


def _local(name: str, *, causal: bool, window: sympy.Expr, sinks: sympy.Expr, block: sympy.Expr,
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
    ops, splits, it, groups = _core(q, k, v, key="w", qranks=("b", "g", "r", "p1", "p0"), form=form, mask=mask)
    ops = pre + ops
    fused = None
    if form == "online":
        groups = [[e.name for e in ops]]
        fused = {0}
    else:
        groups = groups_pre + groups
    return _finish(name, ops, sizes, ("Q", "K", "V", "MASK"), splits, it, groups, schedule, key="w",
                   derived=("m",), fused_groups=fused, tile_ranks=("p0",), query="p1", tile_q=1, tile_k=tile_k, notes=notes, params=params)


def _form(form: str | None, schedule: str) -> str:
    """Default softmax form: online in a fused kernel, library softmax (3 passes over a row) eagerly."""
    return form or ("online" if schedule == "fused" else "3pass")


def sliding_window(*, window: object = None, causal: bool = False, block: object = 64, form: str | None = None,
                   schedule: str = "fused", tile_q: object = 64, tile_k: object = 64) -> Cascade:
    """Sliding window |i-j| < W (and j <= i if causal), computed by query blocks of ``block`` rows."""
    w = _s(window) if window is not None else sym("W")
    form = _form(form, schedule)
    # eagerly, a matmul on the overlapping strided spans copies them first (a gather)
    return _local("sliding_window", causal=causal, window=w, sinks=sympy.Integer(0), block=_s(block), form=form,
                  schedule=schedule, tile_k=tile_k, gather=schedule == "eager", params={"window": w, "block": block},
                  notes="window span per query block" + (", causal" if causal else ""))


def sinks_window(*, window: object = None, sinks: object = None, causal: bool = False, block: object = 64,
                 form: str | None = None, schedule: str = "fused", tile_q: object = 64,
                 tile_k: object = 64) -> Cascade:
    """StreamingLLM sinks + window: the first S keys plus the sliding window."""
    w = _s(window) if window is not None else sym("W")
    s = _s(sinks) if sinks is not None else sym("S")
    form = _form(form, schedule)
    return _local("sinks_window", causal=causal, window=w, sinks=s, block=_s(block), form=form,
                  schedule=schedule, tile_k=tile_k, gather=schedule == "eager",
                  params={"window": w, "sinks": s, "block": block},
                  notes="sinks + window span per query block" + (", causal" if causal else ""))


def block_sparse(*, block: object = 64, keep: object = None, causal: bool = False, form: str | None = None,
                 schedule: str = "fused", tile_q: object = 64, tile_k: object = 64) -> Cascade:
    """Block-sparse top-k: pooled q/k block scores choose keep*M/block key blocks per query block."""
    bs = _s(block)
    form = _form(form, schedule)
    kappa = _s(keep) if keep is not None else sympy.Symbol("kappa", positive=True)
    q = Access("Q", ("b", "g", "r", "p1", "p0", "e"))
    kfull = Access("K", ("b", "g", "m1", "m0", "e"))
    sizes = [("b", B), ("g", G), ("r", H / G), ("p1", P / bs), ("p0", bs), ("m1", M / bs), ("m0", bs),
             ("w", kappa * M), ("e", E), ("f", F)]
    pre = [
        Einsum(Access("QP", ("b", "g", "r", "p1", "e")), (q,), (), ("p0",), "sum"),
        Einsum(Access("KP", ("b", "g", "m1", "e")), (kfull,), (), ("m0",), "sum"),
        Einsum(Access("BS", ("b", "g", "r", "p1", "m1")), (Access("QP", ("b", "g", "r", "p1", "e")),
                                                           Access("KP", ("b", "g", "m1", "e"))), ("mul",), ("e",), "sum"),
        # top-k selection over the key blocks: a max-like reduction, one compare per block score
        Einsum(Access("SEL", ("b", "g", "r", "p1", "w")), (Access("BS", ("b", "g", "r", "p1", "m1")),), ("cmp",),
               ("m1",), "max"),
        Einsum(Access("KW", ("b", "g", "r", "p1", "w", "e")), (Access("SEL", ("b", "g", "r", "p1", "w")),
                                                              Access("K", ("b", "g", "r", "p1", "w", "e"))), ("copy",)),
        Einsum(Access("VW", ("b", "g", "r", "p1", "w", "f")), (Access("SEL", ("b", "g", "r", "p1", "w")),
                                                              Access("V", ("b", "g", "r", "p1", "w", "f"))), ("copy",)),
    ]
    k, v = Access("KW", ("b", "g", "r", "p1", "w", "e")), Access("VW", ("b", "g", "r", "p1", "w", "f"))
    # positions of the gathered keys against the query's: padding always, the future when causal
    mask = Access("SEL", ("b", "g", "r", "p1", "w"))
    ops, splits, it, groups = _core(q, k, v, key="w", qranks=("b", "g", "r", "p1", "p0"), form=form, mask=mask,
                                    mask_ops=("cmp", "cmp", "add") if causal else ("cmp", "add"))
    ops = pre + ops
    sizes.append(("m", M))
    splits = [("m", ("m1", "m0"))] + splits
    if form == "online":
        # pooled scoring and the attention over the chosen blocks are two kernels either way
        groups = [["QP", "KP", "BS", "SEL"], [e.name for e in ops[4:]]]
        fused = {1}
        schedule_groups = "eager"
    else:
        groups = [["QP"], ["KP"], ["BS"], ["SEL"], ["KW"], ["VW"]] + groups
        fused = set()
        schedule_groups = schedule
    return _finish("block_sparse", ops, sizes, ("Q", "K", "V"), splits, it, groups, schedule_groups, key="m",
                   derived=("w",), fused_groups=fused, tile_ranks=("p0",), query="p1", tile_q=1, tile_k=tile_k,
                   notes="pooled block scores + top-k key blocks" + (", causal" if causal else ""),
                   params={"block": bs, "keep": kappa})


def linear(*, causal: bool = False, chunk: object = 64, schedule: str = "fused", form: str = "online",
           tile_q: object = 64, tile_k: object = 64) -> Cascade:
    """Linear attention with feature map phi (elu+1): phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1).

    Causal form is chunked as in flash-linear-attention: exact inside a chunk of C keys,
    a running state carried across chunks (iterative rank c).
    """
    if not causal:
        ops = [
            Einsum(Access("QF", ("b", "g", "r", "p", "e")), (Access("Q", ("b", "g", "r", "p", "e")),), ("phi",)),
            Einsum(Access("KF", ("b", "g", "m", "e")), (Access("K", ("b", "g", "m", "e")),), ("phi",)),
            Einsum(Access("KV", ("b", "g", "e", "f")), (Access("KF", ("b", "g", "m", "e")),
                                                        Access("V", ("b", "g", "m", "f"))), ("mul",), ("m",), "sum"),
            Einsum(Access("KS", ("b", "g", "e")), (Access("KF", ("b", "g", "m", "e")),), (), ("m",), "sum"),
            Einsum(Access("NUM", ("b", "g", "r", "p", "f")), (Access("QF", ("b", "g", "r", "p", "e")),
                                                              Access("KV", ("b", "g", "e", "f"))), ("mul",), ("e",), "sum"),
            Einsum(Access("DEN", ("b", "g", "r", "p")), (Access("QF", ("b", "g", "r", "p", "e")),
                                                         Access("KS", ("b", "g", "e"))), ("mul",), ("e",), "sum"),
            Einsum(Access("AV", ("b", "g", "r", "p", "f")), (Access("NUM", ("b", "g", "r", "p", "f")),
                                                             Access("DEN", ("b", "g", "r", "p"))), ("div",)),
        ]
        groups = [[e.name] for e in ops]
        return _finish("linear", ops, _base_sizes(), ("Q", "K", "V"), [], [], groups, schedule,
                       notes="non-causal, phi(K)^T V state", params={"chunk": chunk})
    c = _s(chunk)
    qa = Access("Q", ("b", "g", "r", "c", "i", "e"))
    qf = Access("QF", ("b", "g", "r", "c", "i", "e"))
    kf = Access("KF", ("b", "g", "c", "j", "e"))
    vv = Access("V", ("b", "g", "c", "j", "f"))
    ops = [
        Einsum(qf, (qa,), ("phi",)),
        Einsum(kf, (Access("K", ("b", "g", "c", "j", "e")),), ("phi",)),
        Einsum(Access("IS", ("b", "g", "r", "c", "i", "j")), (qf, kf), ("mul",), ("e",), "sum"),
        # causal inside the chunk: computed in full, then masked
        Einsum(Access("ISM", ("b", "g", "r", "c", "i", "j")), (Access("IS", ("b", "g", "r", "c", "i", "j")),
                                                              Access("TRIL", ("i", "j"))), ("mul",)),
        Einsum(Access("INTRA", ("b", "g", "r", "c", "i", "f")), (Access("ISM", ("b", "g", "r", "c", "i", "j")), vv),
               ("mul",), ("j",), "sum"),
        Einsum(Access("INTRAD", ("b", "g", "r", "c", "i")), (Access("ISM", ("b", "g", "r", "c", "i", "j")),), (),
               ("j",), "sum"),
        Einsum(Access("CKV", ("b", "g", "c", "e", "f")), (kf, vv), ("mul",), ("j",), "sum"),
        Einsum(Access("CKS", ("b", "g", "c", "e")), (kf,), (), ("j",), "sum"),
        Einsum(Access("S", ("b", "g", "c+1", "e", "f")), (Access("S", ("b", "g", "c", "e", "f")),
                                                          Access("CKV", ("b", "g", "c", "e", "f"))), ("add",)),
        Einsum(Access("Z", ("b", "g", "c+1", "e")), (Access("Z", ("b", "g", "c", "e")),
                                                     Access("CKS", ("b", "g", "c", "e"))), ("add",)),
        Einsum(Access("INTER", ("b", "g", "r", "c", "i", "f")), (qf, Access("S", ("b", "g", "c", "e", "f"))),
               ("mul",), ("e",), "sum"),
        Einsum(Access("INTERD", ("b", "g", "r", "c", "i")), (qf, Access("Z", ("b", "g", "c", "e"))),
               ("mul",), ("e",), "sum"),
        Einsum(Access("NUM", ("b", "g", "r", "c", "i", "f")), (Access("INTRA", ("b", "g", "r", "c", "i", "f")),
                                                               Access("INTER", ("b", "g", "r", "c", "i", "f"))), ("add",)),
        Einsum(Access("DEN", ("b", "g", "r", "c", "i")), (Access("INTRAD", ("b", "g", "r", "c", "i")),
                                                          Access("INTERD", ("b", "g", "r", "c", "i"))), ("add",)),
        Einsum(Access("AV", ("b", "g", "r", "c", "i", "f")), (Access("NUM", ("b", "g", "r", "c", "i", "f")),
                                                              Access("DEN", ("b", "g", "r", "c", "i"))), ("div",)),
    ]
    sizes = [("b", B), ("g", G), ("r", H / G), ("c", M / c), ("i", c), ("j", c), ("e", E), ("f", F), ("m", M)]
    groups = [[e.name] for e in ops]
    return _finish("linear", ops, sizes, ("Q", "K", "V", "TRIL"), [], ["c"], groups, schedule, key="m",
                   derived=("c", "j"), tile_ranks=("i",), tile_q=c, tile_k=c, notes="causal, chunked (exact in chunk, carried state)",
                   params={"chunk": c})


def latent(*, rank: object = None, causal: bool = False, form: str = "online", schedule: str = "fused",
           tile_q: object = 64, tile_k: object = 64) -> Cascade:
    """Low-rank K/V: K = CK·UK, V = CV·UV with rank R; UK is absorbed into q, UV applied to the output."""
    rr = _s(rank) if rank is not None else sym("R")
    q = Access("Q", ("b", "g", "r", "p", "e"))
    ql = Access("QL", ("b", "g", "r", "p", "l"))
    ck, cv = Access("CK", ("b", "g", "m", "l")), Access("CV", ("b", "g", "m", "l"))
    pred = Predicate("causal", causal=True, tile_q=_s(tile_q), tile_k=_s(tile_k)) if causal else None
    core, splits, it, groups = _core(ql, ck, cv, key="m", qranks=("b", "g", "r", "p"), form=form, out="OL",
                                     predicate=pred, fdim="l")
    ops = ([Einsum(ql, (q, Access("UK", ("g", "l", "e"))), ("mul",), ("e",), "sum")] + core +
           [Einsum(Access("AV", ("b", "g", "r", "p", "f")), (Access("OL", ("b", "g", "r", "p", "l")),
                                                             Access("UV", ("g", "l", "f"))), ("mul",), ("l",), "sum")])
    sizes = _base_sizes() + [("l", rr)]
    if form == "online":
        kernel_groups = [["QL"], [e.name for e in core], ["AV"]]
        fused = {1}
    else:
        kernel_groups = [["QL"]] + groups + [["AV"]]
        fused = set()
    return _finish("latent", ops, sizes, ("Q", "CK", "CV", "UK", "UV"), splits, it, kernel_groups, schedule,
                   fused_groups=fused, tile_q=tile_q, tile_k=tile_k, params={"rank": rr},
                   notes="low-rank K/V, up-projections absorbed" + (", causal" if causal else ""))


CASCADES: dict[str, Callable[..., Cascade]] = {
    "dense": dense,
    "dense_2pass": dense_2pass,
    "dense_3pass": dense_3pass,
    "gqa": gqa,
    "gqa_merge": gqa_merge,
    "decode": decode,
    "sliding_window": sliding_window,
    "sinks_window": sinks_window,
    "block_sparse": block_sparse,
    "linear": linear,
    "latent": latent,
}

#: Parameters each variant takes (name -> python type), for the CLI and the planner.
PARAMS: dict[str, dict[str, type]] = {
    "dense": {}, "dense_2pass": {}, "dense_3pass": {}, "gqa": {}, "decode": {},
    "gqa_merge": {"groups": int},
    "sliding_window": {"window": int, "block": int},
    "sinks_window": {"window": int, "sinks": int, "block": int},
    "block_sparse": {"block": int, "keep": float},
    "linear": {"chunk": int},
    "latent": {"rank": int},
}


def build(variant: str, *, causal: bool = False, form: str | None = None, schedule: str = "fused",
          tile_q: object = 64, tile_k: object = 64, **params: object) -> Cascade:
    """Build the named variant's cascade with the given parameters and execution choices."""
    if variant not in CASCADES:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(sorted(CASCADES))}")
    allowed = PARAMS[variant]
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"variant {variant!r} takes no parameter(s) {sorted(unknown)}; "
                         f"it takes: {', '.join(allowed) or 'none'}")
    kw: dict[str, object] = dict(params)
    kw.update(causal=causal, schedule=schedule, tile_q=tile_q, tile_k=tile_k)
    if form is not None and variant not in ("dense_2pass", "dense_3pass"):
        kw["form"] = form
    return CASCADES[variant](**kw)
