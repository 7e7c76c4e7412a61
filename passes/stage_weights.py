"""Weights for pipeline stages: build a model without allocating its parameters, and load each stage's own."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from passes.stages import Stage

logger = logging.getLogger(__name__)

Loader = Callable[[list[str]], dict[str, torch.Tensor]]


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (rotary inv_freq).

    It patches ``nn.Module.register_parameter`` for its duration, so it is not thread-safe. Each parameter is
    still made on its own device first and dropped at once: peak memory is one parameter, never the model.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)  # flags libraries set on their parameters (_is_hf_initialized)
            param = meta
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def materialise(stage: Stage, load: Loader) -> None:
    """Replace every meta parameter and buffer of ``stage.module`` by the loaded tensor of the same name.

    Loaded tensors take the dtype the meta tensor declares; ties inside the stage stay ties. Nothing is
    replaced when a name is missing or a shape differs (ValueError naming them).
    """
    slots = [(name, owner, field, t, is_param) for name, owner, field, t, is_param in _named_slots(stage.module)
             if t.is_meta]
    if not slots:
        return
    names = list(dict.fromkeys(name for name, *_ in slots))
    loaded = load(names)
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"stage {stage.index}: the loader returned no tensor for {missing}; load them from a "
                         "checkpoint of this model")
    wrong = [f"{name} (checkpoint {tuple(loaded[name].shape)}, model {tuple(t.shape)})"
             for name, _, _, t, _ in slots if tuple(loaded[name].shape) != tuple(t.shape)]
    if wrong:
        raise ValueError(f"stage {stage.index}: shapes differ for {', '.join(wrong)}; the checkpoint is not of "
                         "this model's configuration")
    made: dict[int, torch.Tensor] = {}  # one new tensor per loaded tensor, so tied names stay one tensor
    for name, owner, field, t, is_param in slots:
        src = loaded[name]
        key = id(src)
        if key not in made:
            value = src.to(t.dtype)
            made[key] = nn.Parameter(value, requires_grad=t.requires_grad) if is_param else value
        if is_param:
            owner._parameters[field] = made[key]
        else:
            owner._buffers[field] = made[key]
    logger.info("stage %d: loaded %d tensors", stage.index, len(made))


def safetensors_loader(directory: str | Path, model: nn.Module) -> Loader:
    """A loader reading only the requested names from a Hugging Face directory's ``*.safetensors`` shards.

    A name the checkpoint lacks is read under another name of the same tensor in ``model`` (a tied
    ``lm_head.weight`` saved once as ``model.embed_tokens.weight``). Shapes are checked against ``model``.
    """
    from safetensors import safe_open

    directory = Path(directory)
    where = _shards(directory)
    tensors = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
    by_id: dict[int, list[str]] = {}
    for name, t in tensors.items():
        by_id.setdefault(id(t), []).append(name)

    def source(name: str) -> str | None:
        if name in where:
            return name
        return next((a for a in by_id.get(id(tensors[name]), ()) if a in where), None) if name in tensors else None

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        sources = {name: source(name) for name in names}
        missing = [n for n, src in sources.items() if src is None]
        if missing:
            buffers = dict(model.named_buffers(remove_duplicate=False))
            hint = ("; a non-persistent buffer is in no checkpoint, so build the model with meta_parameters() "
                    "to keep its buffers real" if any(n in buffers for n in missing) else "")
            raise ValueError(f"{directory} holds no tensor for {missing} (nor for a name tied to it); save the "
                             f"model with save_pretrained, or load these names another way{hint}")
        read: dict[str, torch.Tensor] = {}
        wrong = []
        by_file: dict[Path, list[str]] = {}
        for src in dict.fromkeys(sources.values()):
            by_file.setdefault(where[src], []).append(src)
        for path, srcs in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for src in srcs:
                    shape = tuple(f.get_slice(src).get_shape())
                    want = [n for n, s in sources.items() if s == src and n in tensors
                            and tuple(tensors[n].shape) != shape]
                    if want:
                        wrong += [f"{n} (checkpoint {src} {shape}, model {tuple(tensors[n].shape)})" for n in want]
                        continue
                    read[src] = f.get_tensor(src)
        if wrong:
            raise ValueError(f"{directory}: shapes differ for {', '.join(wrong)}; the checkpoint is not of this "
                             "model's configuration")
        return {name: read[src] for name, src in sources.items()}

    return load


def _shards(directory: Path) -> dict[str, Path]:
    """Which file of ``directory`` holds each tensor name (from the index when there is one)."""
    from safetensors import safe_open

    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no *.safetensors file; save the model there with "
                         "model.save_pretrained(directory)")
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out.update({name: path for name in f.keys()})
    return out


def _named_slots(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """(dotted name, owner, attribute, tensor, is_parameter) for every parameter and buffer under ``module``."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for field, t in table.items():
                if t is not None:
                    yield (f"{prefix}.{field}" if prefix else field), owner, field, t, is_param
