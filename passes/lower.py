"""Exact dense sites on the CPU call the library's fused SDPA directly, not through ``rewriter::attention``.

On the CPU the ``dense`` kernel is SDPA. Reaching it through the custom op costs a Python dispatch per
call (a few tenths of a millisecond: visible at the lengths encoders run) and a copy: the op promises
compilers a contiguous ``[B, H, P, F]`` result, while SDPA writes its output in the layout of q
(heads-minor when q is a transposed projection), which the model's own transpose back then copies
again. What can be decided once per site is decided here, at rewrite time: a dense call whose
arguments SDPA takes as they are becomes that SDPA call, so the program does what the eager model
does and nothing more. Sites SDPA cannot express (a soft-cap, a finite fill, causal together with a
mask, a Delta correction, fitted tensors) keep the op. ``REWRITER_NATIVE_DENSE=0`` turns this off.
"""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.fx as fx

from passes import graph as G
from passes.emit import Emitter
from passes.variants import exact_name

logger = logging.getLogger(__name__)
aten = torch.ops.aten

OP = "rewriter.attention"


def enabled() -> bool:
    """Whether dense sites are lowered to SDPA (``REWRITER_NATIVE_DENSE=0`` keeps the op everywhere)."""
    return os.environ.get("REWRITER_NATIVE_DENSE", "1") != "0"


def why_not(node: fx.Node) -> str:
    """Why an op call cannot become one SDPA call ('' when it can)."""
    q, k, v, mask, scale, causal, variant, params, extra, *rest = node.args
    softcap = rest[0] if rest else 0.0
    fill = rest[1] if len(rest) > 1 else None
    if variant != exact_name():
        return f"variant {variant}"
    if json.loads(params or "{}"):
        return "parameters (a correction)"
    if extra:
        return "extra tensors"
    if softcap:
        return "soft-capping"
    if mask is not None and causal:
        return "causal together with a mask"
    if mask is not None and fill is not None and G.dtype(mask) == torch.bool:
        return "a finite mask fill"
    if mask is not None and G.dtype(mask) != torch.bool and not G.dtype(mask).is_floating_point:
        return f"a {G.dtype(mask)} mask"
    return ""


def lower_dense(gm: fx.GraphModule, target: str = "cpu") -> int:
    """Replace every dense op call SDPA takes as it is by that SDPA call; returns how many were replaced."""
    if target != "cpu" or not enabled():
        return 0
    done = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and OP in str(n.target)]:
        reason = why_not(node)
        if reason:
            logger.debug("%s stays an op call: %s", node.name, reason)
            continue
        q, k, v, mask, scale, causal = node.args[:6]
        em = Emitter(gm.graph, node)
        if mask is not None and G.dtype(mask) not in (torch.bool, G.dtype(q)):
            mask = em(torch.ops.prims.convert_element_type.default, mask, G.dtype(q))
        gqa = G.shape(k)[1] != G.shape(q)[1]
        out = em(aten.scaled_dot_product_attention.default, q, k, v, mask, 0.0, bool(causal), scale=float(scale),
                 enable_gqa=bool(gqa))
        out.meta.update({key: val for key, val in node.meta.items() if key not in ("val", "tensor_meta")})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
