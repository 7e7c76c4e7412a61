"""Save an optimized model as a directory (model.pt2 + plan.json) and load it in a fresh process."""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import torch

import codegen  # noqa: F401  (the custom op must exist before torch.export.load)
from passes.plan import Plan
from rewriter.api import OptimizedModel
from rewriter.capture import CallSpec
from rewriter.dynamic import LengthRange

logger = logging.getLogger(__name__)

FORMAT = 1


def _pytree_modules(spec) -> list[str]:
    """Python modules defining the container types in an input/output spec (e.g. HF ModelOutput)."""
    found: set[str] = set()
    stack = [spec]
    while stack:
        s = stack.pop()
        if s is None:
            continue
        t = getattr(s, "type", None)
        mod = getattr(t, "__module__", "builtins")
        if t is not None and mod not in ("builtins", "collections") and not mod.startswith("torch"):
            found.add(mod)
        stack.extend(s.children() if hasattr(s, "children") else [])
    return sorted(found)


def export(opt: OptimizedModel, path: str | Path) -> Path:
    """Write ``opt`` to directory ``path`` as model.pt2 and plan.json; returns the directory."""
    if not isinstance(opt, OptimizedModel):
        raise TypeError(f"export expects the module rewriter.optimize returned, not {type(opt).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(opt.program, out / "model.pt2")
    meta = {"format": FORMAT, "plan": opt.plan.to_json(), "call": opt.spec.to_json(),
            "signature": opt.captured_for, "report": str(opt.plan),
            "lengths": None if opt.lengths is None else opt.lengths.to_json(), "example_shapes": opt.example_shapes,
            "pytree_modules": _pytree_modules(opt.program.call_spec.in_spec)
            + _pytree_modules(opt.program.call_spec.out_spec)}
    (out / "plan.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    logger.info("exported to %s", out)
    return out


def load(path: str | Path) -> OptimizedModel:
    """Load a directory written by ``export``; the result has the original call signature and plan."""
    src = Path(path)
    if not (src / "model.pt2").exists() or not (src / "plan.json").exists():
        raise FileNotFoundError(f"{src} is not a rewriter artifact (needs model.pt2 and plan.json)")
    meta = json.loads((src / "plan.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{src}: artifact format {meta.get('format')} is not {FORMAT}; re-export it")
    for mod in meta.get("pytree_modules", []):
        # Output containers (Hugging Face ModelOutput, say) register with pytree when their module loads.
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ImportError(f"{src}: the model's inputs/outputs use types from {mod!r}; install it ({e})") from e
    program = torch.export.load(src / "model.pt2")
    call = meta["call"]
    spec = CallSpec(call["names"], call["captured"], call.get("injected", {}), call.get("var_positional", False))
    rng = meta.get("lengths")
    lengths = None if rng is None else LengthRange(tuple(rng["names"]), int(rng["low"]), int(rng["high"]))
    return OptimizedModel(program, spec, Plan.from_json(meta["plan"]), rebuild=None, captured_for=meta["signature"],
                          lengths=lengths, example_shapes=meta.get("example_shapes"))
