"""The record of one attention found in a graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionSite:
    """One attention in a captured graph, described by what its dataflow shows."""

    name: str  # module path of the attention, e.g. "model.layers.0.self_attn" ("" at top level)
    index: int  # position among the sites of the graph, in graph order
    spelling: str  # how the scores were written: sdpa | matmul | bmm | mm | einsum | baddbmm
    causal: Optional[bool]  # None: not known (a refused site the finder could not read that far)
    mask_kind: str  # none | causal | padding | bool | additive (| unknown, on a refused site)
    is_cross: Optional[bool]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    q_len: int
    kv_len: int
    batch: int
    scale: float
    rewritable: bool = True
    reason: str = ""  # why the site stays as it was, when not rewritable
    notes: tuple[str, ...] = field(default=())
    window: Optional[int] = None  # the site's own mask is a band: key j visible to query i when |i - j| < window
    softcap: float = 0.0  # scores soft-capped as softcap * tanh(s / softcap) before the mask (0: none)
    has_bias: bool = False  # a float term adds values at visible positions (ALiBi, relative position bias)
    fill: Optional[float] = None  # finite score of positions the mask hides (a model's masked_fill value)
    score_ops: int = 0  # separate element-wise ops the model runs over the full score matrix (scale, mask, cast)

    def describe(self) -> str:
        """A one-line human summary of the site ("unknown" where a refused site could not be read)."""
        flags = ["causal=unknown" if self.causal is None else ("causal" if self.causal else "bidirectional"),
                 "cross=unknown" if self.is_cross is None else ("cross" if self.is_cross else "self")]
        if self.window is not None:
            flags[0] += f", window={self.window}"
        if self.softcap:
            flags.append(f"softcap={self.softcap:g}")
        if self.has_bias:
            flags.append("bias")
        heads = f"{_n(self.num_heads)}h" + (
            f"/{_n(self.num_kv_heads)}kv" if self.num_kv_heads != self.num_heads else "")
        return (
            f"{self.name or '<top>'} [{self.spelling}] {', '.join(flags)}, mask={self.mask_kind}, "
            f"{heads}, d={_n(self.head_dim)}, q={_n(self.q_len)}, kv={_n(self.kv_len)}"
        )


def _n(x: int) -> str:
    """A size as text; -1 is a size the finder does not know (data-dependent, or a refused site)."""
    return "unknown" if x < 0 else str(x)


def as_int(x) -> int:
    """A concrete int for a size that may be a SymInt (-1 when it has no hint), never adding a guard."""
    if isinstance(x, torch.SymInt):
        # int() would specialise the size: a compiled graph would then recompile at every new length
        # (a KV cache growing by one token per decode step).
        hint = x.node.hint
        return int(hint) if hint is not None else -1
    try:
        return int(x)
    except Exception:  # a symbolic size without a hint
        return -1
