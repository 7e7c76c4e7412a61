"""Canonical operands: q, k, v brought to [*batch, L, D], and what their layout says about heads and sources."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from passes import graph as G
from passes.context import GraphContext, NotAttention, Unsupported
from passes.site import as_int

# A layout step applied to an operand to bring it to [*batch, L, D]: ("permute", perm),
# ("transpose",), ("unsqueeze", dim) or ("reshape", sizes).
Step = tuple


@dataclass
class Operand:
    """A tensor feeding the attention and the view steps that bring it to canonical layout."""

    node: fx.Node
    steps: list[Step] = field(default_factory=list)


def is_transpose_last2(node: fx.Node) -> bool:
    """True when ``node`` swaps the last two dims of its input (transpose, permute or 2-D t)."""
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


def score_operands(c1: fx.Node) -> tuple[Operand, Operand]:
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
    if is_transpose_last2(b) and G.opname(b) != "t":
        return Operand(a), Operand(b.args[0])
    return Operand(a), Operand(b, [("transpose",)])


def value_operand(c2: fx.Node, probs: fx.Node, nbatch: int, swapped: bool = False) -> tuple[Operand, list[Step]]:
    """v [*b, M, F] and the steps from canonical output [*b, P, F] to c2's layout.

    ``swapped``: the probabilities reach c2 as [*b, M, P] (so ``vᵀ @ pᵀ`` gives the output transposed).
    """
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
        i, j = (sp[-1], sp[-2]) if swapped else (sp[-2], sp[-1])
        fs = set(sv) - set(sp)
        if j not in sv or j in out or len(fs) != 1 or set(out) != set(sp[:-2]) | {i} | fs:
            raise Unsupported(f"einsum {c2.args[0]!r} is not a reduction of probs over keys")
        (f,) = fs
        batch = list(sp[:-2])
        canon = batch + [i, f]
        perm = [canon.index(t) for t in out]
        out_steps = [("permute", perm)] if perm != list(range(len(canon))) else []
        return Operand(vnode, _align_steps(sv, batch + [j, f])), out_steps
    a, b = c2.args[0], c2.args[1]
    if swapped:
        # out [*b, F, P] = vᵀ [*b, F, M] @ pᵀ [*b, M, P]: the same attention, its output transposed
        if b is not probs or a is probs:
            raise NotAttention("the transposed probabilities are not the right operand of the product")
        v = Operand(a.args[0]) if is_transpose_last2(a) and G.opname(a) != "t" else Operand(a, [("transpose",)])
        return v, [("transpose",), ("reshape", tuple(G.shape(c2)))]
    if a is not probs:
        raise NotAttention("probabilities are the right operand of the product (a sum over queries)")
    return Operand(b), [("reshape", tuple(G.shape(c2)))]


def steps_shape(shape: tuple, steps: list[Step]) -> tuple:
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


def canon(op: Operand) -> tuple:
    return steps_shape(G.shape(op.node), op.steps)


def repeat_kv_source(node: fx.Node) -> Optional[fx.Node]:
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
                if (G.opname(inner) in ("slice", "view", "reshape") and G.shape(inner.args[0]) is not None
                        and len(G.shape(inner.args[0])) == 4):
                    return inner.args[0]
    return None


def count_heads(node: fx.Node, batch: tuple, head_dim: int) -> int:
    """Number of heads: the head batch dim when visible, else where a flattening merged it, else the
    width of the projection / head dim."""
    if len(batch) >= 2:
        return as_int(G.prod(batch[1:]))
    x = node
    for _ in range(24):
        s = G.shape(x)
        if s is None:
            break
        if s[-1] != head_dim and as_int(s[-1]) % head_dim == 0:
            return as_int(s[-1]) // head_dim
        name = G.opname(x)
        if name in G.PROJECTION_OPS - {"mm", "matmul", "bmm", "baddbmm", "einsum"} or not x.all_input_nodes:
            break
        src = x.args[0] if isinstance(x.args[0], fx.Node) else x.all_input_nodes[0]
        si = G.shape(src)
        # [B, H, L, D] -> [B*H, L, D]: the flattening shows the heads it merged.
        if (name in G.VIEW_OPS and si is not None and len(si) == len(s) + 1 and G.same_sizes(si[-2:], s[-2:])
                and len(s) == 3):
            return as_int(si[1])
        if name not in G.VIEW_OPS | G.CAST_OPS | {"transpose", "permute", "select", "getitem", "slice"}:
            # an elementwise op (rotary, norm, scale): follow the input of the same size
            same = [i for i in x.all_input_nodes if G.shape(i) is not None and G.same_sizes(G.shape(i), s)]
            if not same:
                break
            src = same[0]
        x = src
    return as_int(batch[-1]) if batch else 1


def projection_sources(ctx: GraphContext, node: fx.Node, limit: int = 400) -> set:
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


# Ops that copy or view K/V without computing: replicating heads (repeat_kv, repeat_interleave,
# a broadcasting expand) is seen as a numel increase along them.
_REPLICATING = G.VIEW_OPS | G.CAST_OPS | frozenset(
    {"permute", "transpose", "t", "repeat_interleave", "repeat", "index_select", "_unsafe_index"}
)


def kv_heads(node: fx.Node, heads: int, batch: int, kv_len: int, head_dim: int) -> int:
    """Distinct K/V heads: elements of K before any head replication over batch·M·D (layout-free)."""
    x = node
    smallest = G.prod(G.shape(x) or (0,))
    for _ in range(40):
        name = G.opname(x)
        if name in _REPLICATING and isinstance(x.args[0], fx.Node):
            x = x.args[0]
        elif name and name not in G.PROJECTION_OPS:
            # an elementwise op after the replication (a scale, rotary): follow the input of the same shape
            same = [i for i in x.all_input_nodes if G.shape(i) is not None and G.same_sizes(G.shape(i), G.shape(x))]
            if not same:
                break
            x = same[0]
        else:
            break
        s = G.shape(x)
        if s is None:
            break
        smallest = min(smallest, G.prod(s), key=as_int)
    per_head = batch * kv_len * head_dim
    n = as_int(smallest)
    if per_head <= 0 or n <= 0 or n % per_head:
        return heads
    g = n // per_head
    return g if 0 < g <= heads and heads % g == 0 else heads
