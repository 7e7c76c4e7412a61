"""Records shared by the finder's passes: the graph context, mask terms and the two refusals."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.fx as fx

from passes import graph as G


@dataclass
class MaskTerm:
    """One mask operation on the scores, in the order the graph applies it."""

    kind: str  # "add" (scores + node*factor) | "keep" (where node, scores, fill) | "drop" (masked_fill)
    node: fx.Node
    factor: float = 1.0
    fill: float = -math.inf
    layout: Optional[tuple] = None  # shape of the scores where the term is applied (flattened [B*H] or not)


class NotAttention(Exception):
    """The pattern is not an attention (no report)."""


class Unsupported(Exception):
    """The pattern is an attention we cannot rewrite safely (reported with the reason)."""


class Refused(Unsupported):
    """Unsupported, raised once part of the site is known (``known``: operands, ops), so the report can
    say what is known instead of guessing."""

    def __init__(self, reason: str, known: dict):
        super().__init__(reason)
        self.known = dict(known)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (messages from torch run to pages)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]


@dataclass
class GraphContext:
    """What the finder needs to know about a graph beyond its nodes."""

    graph: fx.Graph
    user_inputs: set  # placeholder nodes that carry the caller's data
    constants: dict  # placeholder/get_attr name -> tensor (parameters, buffers, lifted constants)
    dynamic: bool = False  # symbolic shapes: static masks are not evaluated
    shape_reads_are_lengths: bool = False  # torch.export graphs: sym_size nodes cut the data dependence
    evaluated: dict = field(default_factory=dict)  # static mask node -> computed value (or None)
    derived: dict = field(default_factory=dict)  # write node -> what the finder made of it (built once)
    _activations: Optional[set] = None
    _dg: Any = None
    _live: Optional[set] = None
    _written: Optional[set] = None
    _order: Optional[dict] = None

    @property
    def dg(self):
        """The graph as a networkx DiGraph (built once)."""
        if self._dg is None:
            self._dg = G.to_digraph(self.graph)
        return self._dg

    def refresh(self) -> None:
        """Forget what was derived from the nodes (after the finder added some to the graph)."""
        self._dg = self._activations = self._live = self._written = self._order = None

    @property
    def order(self) -> dict:
        """Each node's position in the graph."""
        if self._order is None:
            self._order = {n: i for i, n in enumerate(self.graph.nodes)}
        return self._order

    @property
    def live(self) -> set:
        """Nodes whose values reach the graph's outputs or an in-place write (the rest is dead code)."""
        if self._live is None:
            roots = [n for n in self.graph.nodes if n.op == "output" or G.mutates(n)]
            live: set = set(roots)
            stack = list(roots)
            while stack:
                for a in stack.pop().all_input_nodes:
                    if a not in live:
                        live.add(a)
                        stack.append(a)
            self._live = live
        return self._live

    @property
    def written(self) -> set:
        """Nodes an in-place op writes into, directly or through a view (empty for a functional graph)."""
        if self._written is None:
            self._written = G.written_in_place(self.graph)
        return self._written

    @property
    def activations(self) -> set:
        """Nodes whose values depend on the caller's inputs."""
        if self._activations is None:
            # the data's dependents, not its shape's: in an exported program, sizes read with sym_size are
            # lengths, and what is built from them alone (a causal mask of arange(T)) is no activation
            reads = ([n for n in self.graph.nodes if G.opname(n) in G.SHAPE_READS] if self.shape_reads_are_lengths
                     else [])
            self._activations = G.depends_on(self.dg, self.user_inputs, stop=reads)
        return self._activations
