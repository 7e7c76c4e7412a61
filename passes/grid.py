"""Find the image token grid of a site from the patch embedding in the graph's dataflow.

A vision transformer turns an image into tokens with one strided convolution ([B, C, rows, cols])
flattened row-major into [B, rows*cols, C]; class or register tokens are concatenated before
(or after) the patch tokens. A site has a grid when exactly one such convolution feeds its
queries and its sequence is the global tokens plus rows*cols patch tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from passes import graph as G

logger = logging.getLogger(__name__)

_CONVS = {"conv2d", "convolution", "_convolution"}
_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "transpose", "permute", "clone", "contiguous", "alias"}


@dataclass(frozen=True)
class TokenGrid:
    """Patch tokens form a rows x cols grid after ``prefix`` global tokens (and ``suffix`` after it)."""

    rows: int
    cols: int
    prefix: int
    suffix: int = 0


def _tokens_of(conv: fx.Node) -> Optional[fx.Node]:
    """The [B, rows*cols, C] token tensor a convolution's output becomes, checked by replaying the views."""
    b, c, h, w = (int(s) for s in G.shape(conv))
    x, chain = conv, []
    for _ in range(6):
        users = [u for u in G.users(x) if G.opname(u) in _VIEWS]
        if len(users) != 1:
            return None
        x = users[0]
        chain.append(x)
        s = G.shape(x)
        if s is not None and tuple(int(d) for d in s) == (b, h * w, c):
            idx = torch.arange(b * c * h * w).reshape(b, c, h, w)
            try:
                for n in chain:
                    idx = n.target(idx, *n.args[1:], **{k: v for k, v in n.kwargs.items() if k != "memory_format"})
            except Exception:  # not replayable: not provably row-major
                return None
            want = torch.arange(b * c * h * w).reshape(b, c, h * w).transpose(1, 2)
            return x if torch.equal(idx, want) else None
    return None


def token_grid(dg: nx.DiGraph, q_input: fx.Node, length: int) -> Optional[TokenGrid]:
    """The site's token grid, or None when its queries do not come from one patch embedding of that size."""
    convs = [n for n in nx.ancestors(dg, q_input) if G.opname(n) in _CONVS and len(G.shape(n) or ()) == 4]
    if len(convs) != 1:
        return None
    conv = convs[0]
    tokens = _tokens_of(conv)
    if tokens is None:
        return None
    _, _, rows, cols = (int(s) for s in G.shape(conv))
    prefix = suffix = 0
    cats = [u for u in G.users(tokens) if G.opname(u) == "cat"]
    if cats:
        cat = cats[0]
        dim = G.arg(cat, 1, "dim", 0)
        parts = list(cat.args[0])
        if dim not in (1, -2) or tokens not in parts:
            return None
        at = parts.index(tokens)
        prefix = sum(int(G.shape(p)[1]) for p in parts[:at])
        suffix = sum(int(G.shape(p)[1]) for p in parts[at + 1:])
    if prefix + rows * cols + suffix != length:
        return None
    return TokenGrid(rows, cols, prefix, suffix)
