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
