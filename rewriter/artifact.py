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


class ArtifactError(ValueError):
    """An artifact directory is corrupted or partial; the message names the file."""


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is corrupted (not readable JSON: {e}); re-export the artifact") from e
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is corrupted (expected a JSON object); re-export the artifact")
    missing = [k for k in ("format", "plan", "call", "signature") if k not in meta]
    if missing:
        raise ArtifactError(f"{path} is partial: missing {', '.join(missing)}; re-export the artifact")
    return meta


def load(path: str | Path) -> OptimizedModel:
    """Load a directory written by ``export``; the result has the original call signature and plan."""
    src = Path(path)
    missing = [f for f in ("model.pt2", "plan.json") if not (src / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{src} is not a rewriter artifact (needs model.pt2 and plan.json; missing {', '.join(missing)})")
    meta = _read_meta(src / "plan.json")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{src}: artifact format {meta.get('format')} is not {FORMAT}; re-export it")
    for mod in meta.get("pytree_modules", []):
        # Output containers (Hugging Face ModelOutput, say) register with pytree when their module loads.
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ImportError(f"{src}: the model's inputs/outputs use types from {mod!r}; install it ({e})") from e
    try:
        program = torch.export.load(src / "model.pt2")
    except Exception as e:  # zip, pickle and schema errors all mean the same thing to the user
        raise ArtifactError(f"{src / 'model.pt2'} is corrupted or partial ({type(e).__name__}: {e}); "
                            "re-export the artifact") from e
    try:
        call = meta["call"]
        spec = CallSpec(call["names"], call["captured"], call.get("injected", {}), call.get("var_positional", False))
        plan = Plan.from_json(meta["plan"])
        rng = meta.get("lengths")
        lengths = None if rng is None else LengthRange(tuple(rng["names"]), int(rng["low"]), int(rng["high"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{src / 'plan.json'} is corrupted ({type(e).__name__}: {e}); re-export the artifact") from e
    return OptimizedModel(program, spec, plan, rebuild=None, captured_for=meta["signature"], lengths=lengths,
                          example_shapes=meta.get("example_shapes"))
