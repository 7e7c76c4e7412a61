"""Finding rotary position embeddings on an attention site's keys, from the graph's dataflow.

The key operand of a site is recognised as ``k_rot = k·cos + rotate(k)·sin`` (either order of each
product and of the sum) when the tensor ``rotate(k)`` is computed from ``k`` alone by ops that, replayed
on a probe tensor, give exactly ``codegen.rotary.rotate`` in one of its layouts (``rotate_half`` or
interleaved pairs). Only view-only ops (and repeat_kv's expand + reshape) may sit between ``k_rot`` and
the op. What is returned is the pre-rotation ``k`` node (latent factors it, before the rotation) and the
``cos`` / ``sin`` nodes the model computed, which the rewritten op takes as operands. Nothing is read
from module or class names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from codegen import rotary
from passes import graph as G

logger = logging.getLogger(__name__)

VIEWS = G.VIEW_OPS | {"transpose", "permute", "_unsafe_view"}
_COMPLEX = {"view_as_complex", "view_as_real", "polar", "complex"}


@dataclass(frozen=True)
class Rotary:
    """A site's rotated keys: ``rotated = key·cos + rotate(key)·sin`` in layout ``form``."""

    form: str  # one of codegen.rotary.FORMS
    key: fx.Node  # the keys before the rotation, [B, G, M, E]
    cos: fx.Node  # broadcastable to [B, G, M, E]
    sin: fx.Node
    rotated: fx.Node


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            raise ValueError("a size without a hint")
        return int(hint)
    return int(s)


def _concrete(a: Any) -> Any:
    """A non-tensor argument's value for replay (sizes from the capture's hints)."""
    if isinstance(a, fx.Node):
        v = G.val(a)
        if isinstance(v, torch.Tensor) or v is None:
            raise ValueError(f"{a.name} is a tensor not computed from the keys")
        return _hint(v)
    return a


def _between(x: fx.Node, y: fx.Node, limit: int = 24) -> Optional[list[fx.Node]]:
    """The nodes computing y from x (y included), or None when y needs another tensor or is too far."""
    found: dict[fx.Node, bool] = {}

    def visit(n: fx.Node, depth: int) -> bool:
        if n is x:
            return True
        if n in found:
            return found[n]
        if depth > limit or n.op != "call_function":
            found[n] = False
            return False
        deps = [visit(a, depth + 1) for a in n.all_input_nodes]
        found[n] = any(deps)
        return found[n]

    if not visit(y, 0):
        return None
    order = {n: i for i, n in enumerate(y.graph.nodes)}
    return sorted((n for n, d in found.items() if d), key=order.__getitem__)


def rotation_form(x: fx.Node, y: fx.Node) -> Optional[str]:
    """The layout in which y == rotate(x), checked by replaying the ops between them on a probe tensor."""
    nodes = _between(x, y)
    shp = G.shape(x)
    if not nodes or shp is None or G.dtype(x) is None or not G.dtype(x).is_floating_point:
        return None
    try:
        probe = torch.randn(*(_hint(s) for s in shp), generator=torch.Generator().manual_seed(0))
        env: dict[fx.Node, Any] = {x: probe}
        for n in nodes:
            args = fx.node.map_arg(n.args, lambda a: env[a] if a in env else _concrete(a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a] if a in env else _concrete(a))
            env[n] = n.target(*args, **kwargs)
        out = env[y]
    except Exception as e:  # an op that cannot be replayed on its own: not provably a rotation
        logger.debug("rotary replay of %s failed: %s", y.name, e)
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape or probe.shape[-1] % 2:
        return None
    for form in rotary.FORMS:
        if torch.equal(out.float(), rotary.rotate(probe, form)):
            return form
    return None


def _depends(n: Any, x: fx.Node, limit: int = 24) -> bool:
    if not isinstance(n, fx.Node):
        return False
    return _between(x, n, limit) is not None


def _broadcasts(t: fx.Node, shape: tuple) -> bool:
    s = G.shape(t)
    if s is None or len(s) > len(shape) or not s or s[-1] != shape[-1]:
        return False
    try:
        torch.broadcast_shapes(tuple(_hint(d) for d in s), tuple(_hint(d) for d in shape))
    except (RuntimeError, ValueError):
        return False
    return True


def _rotated(add: fx.Node) -> Optional[Rotary]:
    """``add`` as key·cos + rotate(key)·sin, when it is one."""
    if G.opname(add) != "add" or len(add.args) < 2 or not all(isinstance(a, fx.Node) for a in add.args[:2]):
        return None
    if len(add.args) > 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args[:2]
    for m1, m2 in ((a, b), (b, a)):
        if G.opname(m1) != "mul" or G.opname(m2) != "mul":
            continue
        for x, c in (m1.args[:2], m1.args[1::-1]):
            if not isinstance(x, fx.Node) or not isinstance(c, fx.Node) or G.shape(x) != G.shape(add):
                continue
            for y, s in (m2.args[:2], m2.args[1::-1]):
                if not isinstance(y, fx.Node) or not isinstance(s, fx.Node):
                    continue
                form = rotation_form(x, y)
                if form is None or _depends(c, x) or _depends(s, x):
                    continue
                if _broadcasts(c, G.shape(x)) and _broadcasts(s, G.shape(x)):
                    return Rotary(form, x, c, s, add)
    return None


def _complex_near(n: fx.Node, depth: int = 6) -> bool:
    if G.opname(n) in _COMPLEX or (G.dtype(n) is not None and G.dtype(n).is_complex):
        return True
    return depth > 0 and any(_complex_near(a, depth - 1) for a in n.all_input_nodes)


def find_rotary(op_input: fx.Node) -> tuple[Optional[Rotary], str]:
    """The rotary embedding behind an op's key input: (Rotary, "") when recognised, (None, "") when the keys
    are not computed (only viewed) after their projection, else (None, why the computation is not supported)."""
    x = op_input
    for _ in range(16):
        name = G.opname(x)
        if name not in VIEWS and name not in G.CAST_OPS:
            break
        x = x.args[0]
    name = G.opname(x)
    if name in G.PROJECTION_OPS or x.op != "call_function" or name == "latent_up":
        return None, ""
    if _complex_near(x):
        return None, ("its rotary embedding is in complex-number form (view_as_complex); only x·cos + rotate(x)·sin "
                      "with rotate_half or interleaved pairs is supported")
    rot = _rotated(x)
    if rot is not None:
        if len(G.shape(rot.key) or ()) != 4:
            return None, "its rotary embedding is applied in a layout other than [B, heads, tokens, head dim]"
        return rot, ""
    return None, (f"its keys are computed by {name or x.op} after the projection, which is not a recognised rotary "
                  "embedding (x·cos + rotate(x)·sin with rotate_half or interleaved pairs)")
