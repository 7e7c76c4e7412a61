"""``per_head``: each head its own pattern, dense or sinks + sliding window (DuoAttention / MoA style).

Spec: ``window`` and ``sinks`` are lists with one entry per query head (or one entry for every head). Head h
sees the first ``sinks[h]`` keys and the window |i - j| < ``window[h]``; ``window[h] = 0`` is a dense head
(every key). All heads run in one call of the block-map kernel: the block map and the element intervals
are per head, [H, nq, S] and [H, P, 2].
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from codegen.naive import naive_attention
from codegen.pattern import BlockMap, dense_blocks, finish, from_dense_blocks, query_positions, visible
from codegen.registry import KernelVariant, register
from codegen.sparse import no_fill, run_block_map
from cost_model import ir
from cost_model.cascades import local_span, size, softmax_form
from cost_model.ir import sym

NAME = "per_head"


def head_specs(window: Sequence[int], sinks: Optional[Sequence[int]], heads: int) -> tuple[tuple[int, int], ...]:
    """((sinks, window) per head): one entry per head, a single entry meaning every head; else a ValueError."""
    window = [int(w) for w in (window if isinstance(window, (list, tuple)) else [window])]
    sinks = [0] * len(window) if sinks is None else [int(s) for s in (sinks if isinstance(sinks, (list, tuple))
                                                                       else [sinks])]
    for name, got in (("window", window), ("sinks", sinks)):
        if len(got) not in (1, heads):
            raise ValueError(f"{NAME}: {name} has {len(got)} entries for {heads} heads; give one per head "
                             "(or one for every head)")
    if any(w < 0 for w in window) or any(s < 0 for s in sinks):
        raise ValueError(f"{NAME}: window (0 = a dense head) and sinks must be >= 0")
    window = window * heads if len(window) == 1 else window
    sinks = sinks * heads if len(sinks) == 1 else sinks
    return tuple(zip(sinks, window))


def _intervals(spec: tuple[int, int], p: int, m: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, 2] key intervals of one head: (sinks, window), or every key when the window is 0."""
    sinks, window = spec
    qpos = query_positions(p, m)
    none_lo, none_hi = torch.full_like(qpos, m), torch.full_like(qpos, -1)  # an empty interval
    if window == 0:
        lo = torch.stack([torch.zeros_like(qpos), none_lo], 1)
        hi = torch.stack([torch.full_like(qpos, m - 1), none_hi], 1)
    else:
        sink_lo, sink_hi = (torch.zeros_like(qpos), torch.full_like(qpos, sinks - 1)) if sinks else (none_lo, none_hi)
        lo = torch.stack([sink_lo, qpos - (window - 1)], 1)
        hi = torch.stack([sink_hi, qpos + (window - 1)], 1)
    lo, hi = finish(lo, hi, qpos, m, causal)
    return lo, torch.where(hi >= lo, hi, -1)


@functools.lru_cache(maxsize=64)
def head_pattern(specs: tuple[tuple[int, int], ...], p: int, m: int, causal: bool, block: int
                 ) -> tuple[BlockMap, torch.Tensor, torch.Tensor]:
    """Per-head block map [1, H, nq, S] and intervals [H, P, 2], memoised per (heads' specs, lengths)."""
    per = {s: _intervals(s, p, m, causal) for s in set(specs)}
    lo = torch.stack([per[s][0] for s in specs])
    hi = torch.stack([per[s][1] for s in specs])
    flags = {s: dense_blocks(*per[s], m, block, block) for s in per}
    anyb = torch.stack([flags[s][0] for s in specs])[None]
    fullb = torch.stack([flags[s][1] for s in specs])[None]
    return from_dense_blocks(anyb, fullb, block, block), lo, hi


def head_visible(specs: tuple[tuple[int, int], ...], p: int, m: int, causal: bool) -> torch.Tensor:
    """[1, H, P, M] element mask of every head's pattern (references and the dense fallback)."""
    return torch.stack([visible(*_intervals(s, p, m, causal), m) for s in specs])[None]


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, window, sinks=None, **_) -> torch.Tensor:
    """Naive dense attention with each head's element mask."""
    specs = head_specs(window, sinks, q.shape[1])
    return naive_attention(q, k, v, mask, scale, visible=head_visible(specs, q.shape[2], k.shape[2], bool(causal)),
                           softcap=softcap)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
           fill: Optional[float] = None, window, sinks=None, block: int = 64) -> torch.Tensor:
    """Every head's pattern in one call: only each head's sink and window key blocks are visited."""
    no_fill(NAME, mask, fill)
    p, m, h = q.shape[2], k.shape[2], q.shape[1]
    specs = head_specs(window, sinks, h)
    if q.device.type != "cpu":  # no Triton kernel yet: the heads' element masks over dense work
        vis = head_visible(specs, p, m, bool(causal)).to(q.device)
        return naive_attention(q, k, v, mask, scale, visible=vis, softcap=softcap, compute=torch.float32)
    dense = [i for i, (_, w) in enumerate(specs) if w == 0]
    if dense and len(dense) < h and mask is None and not softcap and (p == m or not causal):
        return _split(q, k, v, scale, bool(causal), specs, dense, int(block))
    bm, lo, hi = head_pattern(specs, p, m, bool(causal), int(block))
    return run_block_map(q, k, v, mask, scale, softcap, bm, lo, hi)


def _split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
           specs: tuple[tuple[int, int], ...], dense: list[int], block: int) -> torch.Tensor:
    """Two calls, not one per head: the dense heads through SDPA (the fastest exact kernel there is), the
    windowed heads through the block-map kernel over their own blocks only."""
    h, g = q.shape[1], k.shape[1]
    local = sorted(set(range(h)) - set(dense))
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for heads, run in ((dense, None), (local, tuple(specs[i] for i in local))):
        idx = torch.tensor(heads, device=q.device)
        kv = torch.div(idx, h // g, rounding_mode="floor")  # each query head's K/V head (GQA)
        qh, kh, vh = q.index_select(1, idx), k.index_select(1, kv), v.index_select(1, kv)
        if run is None:
            got = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
        else:
            bm, lo, hi = head_pattern(run, q.shape[2], k.shape[2], causal, block)
            got = run_block_map(qh, kh, vh, None, scale, 0.0, bm, lo, hi)
        out.index_copy_(1, idx, got.to(out.dtype))
    return out


def cascade(*, causal: bool = False, block: object = 64, form: str | None = None, schedule: str = "fused",
            tile_q: object = 64, tile_k: object = 64, **_) -> ir.Cascade:
    """One head group's sinks + window span (a mix is priced as the sum of its groups, each over its heads)."""
    form = softmax_form(form, schedule)
    return local_span(NAME, causal=causal, window=sym("W"), sinks=sym("S"), block=size(block), form=form,
                      schedule=schedule, tile_k=tile_k, gather=schedule == "eager",
                      params={"window": sym("W"), "sinks": sym("S"), "block": block},
                      notes="per-head sinks + window span, one head group" + (", causal" if causal else ""))


KERNEL = register(KernelVariant(
    name=NAME, kernel=kernel, reference=reference, compiled_cpu=True, cascade=cascade,
    examples=lambda n, h=4: [
        {"window": [0] + [max(1, n // 4)] * (h - 1), "sinks": [0] + [2] * (h - 1), "block": 16},
        {"window": [(i % 3) * 3 for i in range(h)], "sinks": [i % 2 for i in range(h)], "block": 16},
        {"window": [5], "sinks": [0]}],
    degenerate=lambda n, e: {"window": [0]}))
