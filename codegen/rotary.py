"""Rotary position embeddings as the attention ops apply them: x·cos + rotate(x)·sin, and its inverse.

Two layouts of the rotated pairs are supported: ``half`` (Llama / GPT-NeoX ``rotate_half``: the pair of
coordinate i is i + E/2, rotate(x) = cat(-x2, x1)) and ``interleaved`` (GPT-J style: the pair of 2i is
2i + 1, rotate(x) = stack(-x[1::2], x[0::2]).flatten()). ``cos`` and ``sin`` broadcast to x
([..., M, E]); they are whatever the model computed (scaled cos/sin, as in YaRN, are fine).
"""
from __future__ import annotations

import torch

FORMS = ("half", "interleaved")


def _split(x: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    if form == "half":
        return x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    if form == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    raise ValueError(f"rotary form {form!r} is not one of {FORMS}")


def _merge(a: torch.Tensor, b: torch.Tensor, form: str) -> torch.Tensor:
    if form == "half":
        return torch.cat((a, b), dim=-1)
    return torch.stack((a, b), dim=-1).flatten(-2)


def rotate(x: torch.Tensor, form: str) -> torch.Tensor:
    """The quarter turn of each pair: (a, b) -> (-b, a), in the pairs' layout ``form``."""
    a, b = _split(x, form)
    return _merge(-b, a, form)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, form: str) -> torch.Tensor:
    """x·cos + rotate(x)·sin (cos and sin cast to x's dtype)."""
    return x * cos.to(x.dtype) + rotate(x, form) * sin.to(x.dtype)


def undo(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, form: str) -> torch.Tensor:
    """The x with ``apply(x, cos, sin, form) == y``: each pair's 2x2 map inverted (exact for any cos/sin)."""
    shape = torch.broadcast_shapes(y.shape, cos.shape, sin.shape)
    y, cos, sin = (t.to(y.dtype).expand(shape) for t in (y, cos, sin))
    ya, yb = _split(y, form)
    ca, cb = _split(cos, form)
    sa, sb = _split(sin, form)
    # ya = xa·ca - xb·sa, yb = xb·cb + xa·sb
    det = ca * cb + sa * sb
    return _merge((cb * ya + sa * yb) / det, (ca * yb - sb * ya) / det, form)
