"""Emitting ATen nodes into a captured graph with fake values recorded, so later passes and export see shapes."""
from __future__ import annotations

import torch
import torch.fx as fx

from passes import graph as G

aten = torch.ops.aten


class Emitter:
    """Inserts ATen nodes before an anchor and records fake values so later passes and export see shapes."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph = graph
        self.anchor = anchor
        vals = [G.val(n) for n in graph.nodes if isinstance(G.val(n), torch.Tensor)]
        self.fake_mode = torch._guards.detect_fake_mode(vals)

    def _sizes(self, sizes: list) -> list:
        """A reshape's sizes as graph arguments: a symbolic size is recomputed from the graph, never baked in."""
        symbolic = [i for i, x in enumerate(sizes) if isinstance(x, torch.SymInt)]
        if not symbolic:
            return sizes
        if len(symbolic) == 1:  # reshape infers the one size it is not told
            return [-1 if i == symbolic[0] else x for i, x in enumerate(sizes)]
        with self.graph.inserting_before(self.anchor):
            return list(self.graph.materialize_symints(sizes))

    def exact_sizes(self, sizes: list) -> list:
        """Sizes as graph arguments with every symbolic one recomputed from the graph (for factories)."""
        if not any(isinstance(x, torch.SymInt) for x in sizes):
            return list(sizes)
        with self.graph.inserting_before(self.anchor):
            return list(self.graph.materialize_symints(sizes))

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        if target is aten.reshape.default:
            args = (args[0], self._sizes(list(args[1])), *args[2:])
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["nn_module_stack"] = self.anchor.meta.get("nn_module_stack", {})
        fake_args, fake_kwargs = torch.utils._pytree.tree_map(
            lambda a: G.val(a) if isinstance(a, fx.Node) else a, (args, kwargs)
        )
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def steps(self, node: fx.Node, steps: list) -> fx.Node:
        """Apply layout steps (permute / transpose / unsqueeze / reshape / to) to ``node``."""
        for st in steps:
            if st[0] == "permute":
                node = self(aten.permute.default, node, list(st[1]))
            elif st[0] == "transpose":
                nd = len(G.shape(node))
                node = self(aten.permute.default, node, [*range(nd - 2), nd - 1, nd - 2])
            elif st[0] == "unsqueeze":
                node = self(aten.unsqueeze.default, node, st[1])
            elif st[0] == "reshape":
                if not G.same_sizes(G.shape(node), st[1]):
                    node = self(aten.reshape.default, node, list(st[1]))
            elif st[0] == "to":
                if G.dtype(node) != st[1]:
                    node = self(torch.ops.prims.convert_element_type.default, node, st[1])
        return node
