"""Extended-Einsum cascade IR (FuseMax/TeAAL style) with symbolic rank sizes.

Index strings in an :class:`Access` are rank names (``"p"``), the next step of an
iterative rank (``"m1+1"``), or the final value of an iterative rank written in
upper case (``"M1"``), as in the FuseMax notation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import sympy

logger = logging.getLogger(__name__)

#: Map operators an Einsum may apply per point of its iteration space.
MAP_OPS = frozenset({"mul", "add", "sub", "exp", "div", "max", "cmp", "copy", "phi", "neg"})
#: Reduction operators.
REDUCE_OPS = frozenset({"sum", "max"})

#: Standard rank symbols used by every attention cascade.
B, H, G, P, M, E, F = sympy.symbols("B H G P M E F", positive=True, integer=True)


def sym(name: str) -> sympy.Symbol:
    """Return the positive integer sympy symbol used for a rank size or variant parameter."""
    return sympy.Symbol(name, positive=True, integer=True)


@dataclass(frozen=True)
class Access:
    """One tensor operand (or result) of an Einsum with its index expressions."""

    tensor: str
    indices: tuple[str, ...]

    def base(self, index: str) -> str:
        """Return the rank name an index string refers to (``m1+1`` and ``M1`` -> ``m1``)."""
        return index.split("+")[0].strip().lower()

    @property
    def ranks(self) -> tuple[str, ...]:
        """Rank names this access is indexed by."""
        return tuple(self.base(i) for i in self.indices)

    @property
    def final(self) -> frozenset[str]:
        """Iterative ranks read at their final value (upper-case index)."""
        return frozenset(self.base(i) for i in self.indices if i.strip()[:1].isupper())

    @property
    def is_next(self) -> frozenset[str]:
        """Iterative ranks accessed at the next step (``r+1``)."""
        return frozenset(self.base(i) for i in self.indices if "+" in i)

    def __str__(self) -> str:
        return f"{self.tensor}[{','.join(self.indices)}]" if self.indices else self.tensor


@dataclass(frozen=True)
class Predicate:
    """A mask on (query, key) positions, e.g. causal or a sliding window.

    ``kind`` is one of ``causal``, ``window``, ``sinks_window``, ``local`` (a block-local
    window rank whose masked entries are computed and then discarded).  ``params`` holds
    sympy sizes (``W``, ``S``).  ``skip`` says whether masked work is skipped at the
    granularity ``(tile_q, tile_k)``; if False every point is computed and then masked.
    """

    kind: str
    query: str = "p"
    key: str = "m"
    params: tuple[tuple[str, sympy.Expr], ...] = ()
    causal: bool = False
    skip: bool = True
    tile_q: sympy.Expr = sympy.Integer(1)
    tile_k: sympy.Expr = sympy.Integer(1)

    def param(self, name: str) -> sympy.Expr:
        """Return a parameter by name."""
        return dict(self.params)[name]

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params)
        c = "causal," if self.causal and self.kind != "causal" else ""
        return f"{self.kind}({c}{args})" if (args or c) else self.kind


@dataclass(frozen=True)
class Einsum:
    """An extended Einsum: ``out = reduce_op over reduce of ops(inputs)`` under a predicate."""

    out: Access
    inputs: tuple[Access, ...]
    ops: tuple[str, ...] = ()
    reduce: tuple[str, ...] = ()
    reduce_op: str | None = None
    predicate: Predicate | None = None

    def __post_init__(self) -> None:
        bad = [o for o in self.ops if o not in MAP_OPS]
        if bad:
            raise ValueError(f"unknown map op(s) {bad} in Einsum {self.out}")
        if self.reduce and self.reduce_op not in REDUCE_OPS:
            raise ValueError(f"Einsum {self.out} reduces {self.reduce} without a sum/max operator")

    @property
    def name(self) -> str:
        """The output tensor's name (unique within a cascade)."""
        return self.out.tensor

    @property
    def space(self) -> tuple[str, ...]:
        """Ranks of the iteration space: output ranks then reduced ranks."""
        seen: list[str] = []
        for r in self.out.ranks + tuple(self.reduce):
            if r not in seen:
                seen.append(r)
        return tuple(seen)

    @property
    def is_contraction(self) -> bool:
        """True for a multiply-accumulate (the matmul-unit op class)."""
        return self.reduce_op == "sum" and self.ops == ("mul",) and len(self.inputs) == 2

    def __str__(self) -> str:
        args = ", ".join(str(a) for a in self.inputs)
        body = f"{'∘'.join(self.ops)}({args})" if self.ops else args
        if self.is_contraction:
            body = " · ".join(str(a) for a in self.inputs)
        if self.reduce:
            red = {"sum": "Σ", "max": "max"}[self.reduce_op or "sum"]
            body = f"{red}_{{{','.join(self.reduce)}}} {body}"
        pred = f"   if {self.predicate}" if self.predicate else ""
        return f"{self.out} = {body}{pred}"


@dataclass(frozen=True)
class Kernel:
    """A group of Einsums executed as one launch (fused) ``launches`` times."""

    name: str
    einsums: tuple[str, ...]
    launches: sympy.Expr = sympy.Integer(1)
    #: a fused kernel tiles queries by the cascade's tile_q and streams key tiles through
    #: on-chip memory; an eager (library) kernel works row by row with its own blocking
    fused: bool = False


@dataclass(frozen=True)
class Cascade:
    """An ordered list of Einsums over named ranks with symbolic sizes.

    ``key`` names the rank whose passes are counted (keys, M, or a rank derived from it);
    ``splits`` records tiled ranks (``m -> (m1, m0)``) and ``iterative`` the ranks that
    carry running values.  ``kernels`` partitions the Einsums into launches; ``None``
    means the whole cascade is one fused kernel.  ``query`` is the rank tiled by a
    fused kernel's grid (query tiles of ``tile_q`` rows).
    """

    name: str
    einsums: tuple[Einsum, ...]
    sizes: tuple[tuple[str, sympy.Expr], ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    key: str = "m"
    splits: tuple[tuple[str, tuple[str, ...]], ...] = ()
    iterative: tuple[str, ...] = ()
    kernels: tuple[Kernel, ...] | None = None
    query: str = "p"
    tile_q: sympy.Expr = sympy.Integer(64)
    tile_k: sympy.Expr = sympy.Integer(64)
    dtype_bytes: int = 4
    notes: str = ""
    params: tuple[tuple[str, sympy.Expr], ...] = field(default=())
    #: ranks derived from the keys (a gathered window, a chunk index) that count as key sweeps
    derived_keys: tuple[str, ...] = ()
    #: ranks held whole inside one tile (rows of a query block), never spread over a grid
    tile_ranks: tuple[str, ...] = ()
    #: ranks packed with the query rank into one query tile (query heads sharing a KV head)
    query_pack: tuple[str, ...] = ("r",)

    def __post_init__(self) -> None:
        names = [e.name for e in self.einsums]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"cascade {self.name}: tensors written twice: {sorted(dup)}")
        known = set(self.inputs) | set(names)
        for e in self.einsums:
            for a in e.inputs:
                if a.tensor not in known:
                    raise ValueError(f"cascade {self.name}: {e.name} reads unknown tensor {a.tensor}")
            for r in e.space:
                if r not in self.size_map:
                    raise ValueError(f"cascade {self.name}: rank {r!r} of {e.name} has no size")
        if self.kernels is not None:
            covered = [n for k in self.kernels for n in k.einsums]
            if sorted(covered) != sorted(names):
                raise ValueError(f"cascade {self.name}: kernels must partition the Einsums")

    @property
    def size_map(self) -> dict[str, sympy.Expr]:
        """Rank name -> sympy size."""
        return dict(self.sizes)

    def einsum(self, name: str) -> Einsum:
        """Return the Einsum writing tensor ``name``."""
        for e in self.einsums:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def key_parts(self) -> frozenset[str]:
        """The key rank and the tile ranks it is split into."""
        parts = {self.key, *self.derived_keys}
        for whole, pieces in self.splits:
            if whole in parts:
                parts.update(pieces)
        return frozenset(parts)

    def producer(self) -> dict[str, Einsum]:
        """Tensor name -> the Einsum that writes it."""
        return {e.name: e for e in self.einsums}

    def kernel_list(self) -> tuple[Kernel, ...]:
        """The kernel partition (one fused kernel by default)."""
        if self.kernels is not None:
            return self.kernels
        return (Kernel("fused", tuple(e.name for e in self.einsums), fused=True),)

    def replace(self, **changes: object) -> "Cascade":
        """Return a copy with fields replaced (the IR is immutable)."""
        from dataclasses import replace as _replace

        return _replace(self, **changes)  # type: ignore[arg-type]

    def subs(self, values: Mapping[sympy.Symbol | str, object]) -> dict[sympy.Symbol, object]:
        """Normalise a {symbol-or-name: value} mapping to sympy symbols."""
        out: dict[sympy.Symbol, object] = {}
        for k, v in values.items():
            out[sym(k) if isinstance(k, str) else k] = v
        return out

    def __str__(self) -> str:
        lines = [f"cascade {self.name}" + (f"  ({self.notes})" if self.notes else "")]
        lines.append("  ranks: " + ", ".join(f"{r}={s}" for r, s in self.sizes))
        if self.iterative:
            lines.append("  iterative: " + ", ".join(self.iterative))
        kern_of = {n: k.name for k in self.kernel_list() for n in k.einsums}
        multi = len(self.kernel_list()) > 1
        for e in self.einsums:
            tag = f"   [{kern_of[e.name]}]" if multi else ""
            lines.append(f"  {e}{tag}")
        return "\n".join(lines)
