"""Run an exported program with its weights passed in, not looked up: the per-call cost of eager, no more.

``ExportedProgram.module()`` re-attaches the weights as submodule attributes; its generated forward
then reads every weight through a chain of ``nn.Module.__getattr__`` calls (four for
``blocks.0.ln1.weight``) and checks the inputs' structure on every call: about 0.25 ms per forward
of a six-layer model, which is the whole margin at the lengths encoders run. The lifted graph takes
weights as arguments; binding them once here leaves one Python call per op, as in eager.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

logger = logging.getLogger(__name__)


def flat_runner(ep: torch.export.ExportedProgram) -> Optional[Callable[..., Any]]:
    """A callable ``f(**kwargs)`` running ``ep``'s lifted graph with its weights bound, or None when it cannot.

    None when the program mutates buffers or inputs, or carries effect tokens or script objects:
    ``ep.module()`` handles those.
    """
    sig = ep.graph_signature
    if any(o.kind != OutputKind.USER_OUTPUT for o in sig.output_specs):
        return None
    fixed: list[Optional[torch.Tensor]] = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            fixed.append(None)
        elif spec.kind == InputKind.PARAMETER:
            fixed.append(ep.state_dict[spec.target])
        elif spec.kind == InputKind.BUFFER:
            fixed.append(ep.state_dict[spec.target] if spec.persistent else ep.constants[spec.target])
        elif spec.kind == InputKind.CONSTANT_TENSOR and isinstance(ep.constants.get(spec.target), torch.Tensor):
            fixed.append(ep.constants[spec.target])
        else:
            return None
    gm, in_spec, out_spec = ep.graph_module, ep.call_spec.in_spec, ep.call_spec.out_spec
    n_user = sum(f is None for f in fixed)
    if in_spec is None or out_spec is None or in_spec.num_leaves != n_user:
        return None

    def run(**kwargs: Any) -> Any:
        try:
            flat = fx_pytree.tree_flatten_spec(((), kwargs), in_spec)
        except (KeyError, IndexError, TypeError) as e:
            raise TypeError(f"the program's inputs do not match the ones it was captured with ({e})") from None
        if len(flat) != n_user:
            raise TypeError(f"the program takes {n_user} input tensors and got {len(flat)}")
        user = iter(flat)
        return pytree.tree_unflatten(gm(*(next(user) if f is None else f for f in fixed)), out_spec)

    return run
