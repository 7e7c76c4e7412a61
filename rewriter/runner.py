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
import torch.utils._pytree as pytree

from passes.program_inputs import flat_inputs

logger = logging.getLogger(__name__)


def flat_runner(ep: torch.export.ExportedProgram) -> Optional[Callable[..., Any]]:
    """A callable ``f(**kwargs)`` running ``ep``'s lifted graph with its weights bound, or None when it cannot.

    None when the program mutates buffers or inputs, or carries effect tokens or script objects:
    ``ep.module()`` handles those.
    """
    bind = flat_inputs(ep)
    if bind is None:
        return None
    gm, out_spec = ep.graph_module, ep.call_spec.out_spec

    def run(**kwargs: Any) -> Any:
        return pytree.tree_unflatten(gm(*bind(kwargs)), out_spec)

    return run
