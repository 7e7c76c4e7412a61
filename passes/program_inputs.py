"""The flat arguments of an exported program's lifted graph: its weights bound once, the user's inputs per call.

``ep.graph_module`` takes every parameter, buffer and constant before the user's inputs. Running it with
those bound (rather than through ``ep.module()``, which looks each weight up by attribute on every call)
is what the optimized module does per forward, and what calibration's interpreter runs node by node.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx._pytree as fx_pytree
from torch.export.graph_signature import InputKind, OutputKind


def flat_inputs(ep: torch.export.ExportedProgram) -> Optional[Callable[[dict], list]]:
    """``f(kwargs) -> [graph arguments]`` for ``ep``'s lifted graph, or None when it cannot be bound so.

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
    in_spec = ep.call_spec.in_spec
    n_user = sum(f is None for f in fixed)
    if in_spec is None or ep.call_spec.out_spec is None or in_spec.num_leaves != n_user:
        return None

    def bind(kwargs: dict) -> list:
        try:
            flat = fx_pytree.tree_flatten_spec(((), kwargs), in_spec)
        except (KeyError, IndexError, TypeError) as e:
            raise TypeError(f"the program's inputs do not match the ones it was captured with ({e})") from None
        if len(flat) != n_user:
            raise TypeError(f"the program takes {n_user} input tensors and got {len(flat)}")
        user: Any = iter(flat)
        return [next(user) if f is None else f for f in fixed]

    return bind
