"""``neighborhood_2d``: NATTEN-style 2-D neighbourhood attention over an image token grid.

Tokens: ``prefix`` global tokens, then rows·cols grid tokens in row-major order, then (if any)
more global tokens.  A grid query sees the kh×kw grid keys centred on it, the window shifted
inwards at the borders so it always holds exactly min(kh,rows)·min(kw,cols) grid keys, plus every
global key; a global query sees every key.  Spec: kh + 2 key intervals per query (one per
neighbourhood row, the prefix and the suffix).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.pattern import register_pattern
from codegen.registry import KernelVariant, TritonKernel, register
from codegen.sparse import no_fill, reference_pattern, run_pattern
from codegen.variants import sliding_window

VARIANT = "neighborhood_2d"


@register_pattern(VARIANT)
def pattern(qpos: torch.Tensor, m: int, p: int, *, grid, kernel, prefix: int = 0, **_
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, kh+2] key intervals of each query (absolute key positions)."""
    rows, cols = (int(x) for x in grid)
    kh, kw = (int(x) for x in kernel)
    prefix = int(prefix)
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError("neighborhood_2d: kernel sizes must be odd and >= 1")
    end = prefix + rows * cols
    if end > m:
        raise ValueError(f"neighborhood_2d: prefix {prefix} + grid {rows}x{cols} exceeds {m} keys")
    t = qpos - prefix
    in_grid = (t >= 0) & (t < rows * cols)
    r, c = torch.div(t, cols, rounding_mode="floor"), torch.remainder(t, cols)
    nr, nc = min(kh, rows), min(kw, cols)
    r0 = (r - kh // 2).clamp(min=0).clamp(max=rows - nr)
    c0 = (c - kw // 2).clamp(min=0).clamp(max=cols - nc)
    a = torch.arange(kh)[None, :]
    row_lo = prefix + (r0[:, None] + a) * cols + c0[:, None]
    row_hi = row_lo + nc - 1
    row_ok = (a < nr) & in_grid[:, None]
    row_lo = torch.where(row_ok, row_lo, 1)
    row_hi = torch.where(row_ok, row_hi, 0)
    n = qpos.shape[0]
    glob_lo = torch.where(in_grid, 0, 0)[:, None]
    glob_hi = torch.where(in_grid, prefix - 1, m - 1)[:, None]   # a global query sees every key
    suf_lo = torch.full((n, 1), end, dtype=qpos.dtype)
    suf_hi = torch.full((n, 1), m - 1, dtype=qpos.dtype)
    return torch.cat([glob_lo, suf_lo, row_lo], 1), torch.cat([glob_hi, suf_hi, row_hi], 1)


def _params(grid, kernel, prefix) -> dict:
    return {"grid": [int(x) for x in grid], "kernel": [int(x) for x in kernel], "prefix": int(prefix)}


def reference(q, k, v, mask, scale, causal, *, softcap: float = 0.0, grid, kernel, prefix: int = 0, **_
              ) -> torch.Tensor:
    """Naive dense attention with the neighbourhood element mask."""
    return reference_pattern(VARIANT, _params(grid, kernel, prefix), q, k, v, mask, scale, causal, softcap)


def kernel_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
              causal: bool, *, extra: Sequence[torch.Tensor] = (), softcap: float = 0.0,
              fill: Optional[float] = None, grid, kernel, prefix: int = 0, block: int = 64) -> torch.Tensor:
    """2-D neighbourhood attention visiting only the key blocks of each query block's neighbourhoods."""
    no_fill(VARIANT, mask, fill)
    return run_pattern(VARIANT, _params(grid, kernel, prefix), q, k, v, mask, scale, causal, softcap,
                       int(block))


def triton_visible(spec) -> list[str]:
    """The neighbourhood's element test in Triton (key j against absolute query position i)."""
    rows, cols = (int(x) for x in spec.param("grid"))
    kh, kw = (int(x) for x in spec.param("kernel"))
    pre = int(spec.param("prefix", 0))
    nr, nc = min(kh, rows), min(kw, cols)
    return [
        f"    # grid {rows}x{cols} after {pre} global tokens; window {kh}x{kw} shifted inside the grid",
        f"    t = qpos - {pre}",
        f"    q_in = (t >= 0) & (t < {rows * cols})",
        "    t = tl.where(q_in, t, 0)",
        f"    r0 = tl.minimum(tl.maximum(t // {cols} - {kh // 2}, 0), {rows - nr})",
        f"    c0 = tl.minimum(tl.maximum(t % {cols} - {kw // 2}, 0), {cols - nc})",
        f"    u = kpos - {pre}",
        f"    k_in = (u >= 0) & (u < {rows * cols})",
        "    u = tl.where(k_in, u, 0)",
        f"    kr = u // {cols}",
        f"    kc = u % {cols}",
        f"    near = (kr >= r0) & (kr < r0 + {nr}) & (kc >= c0) & (kc < c0 + {nc})",
        "    vis = (~q_in) | (~k_in) | near  # global queries and keys see / are seen by all",
    ]


def _spec_params(params: dict) -> dict:
    out = {k: params[k] for k in ("grid", "kernel", "prefix", "block") if k in params}
    out.setdefault("prefix", 0)
    out = {k: ([int(x) for x in v] if k in ("grid", "kernel") else v) for k, v in out.items()}
    out["block"] = int(out.get("block", 64))
    return out


def window_keys(kernel=(7, 7), **_) -> int:
    """The 1-D non-causal window that visits as many keys as a kh x kw neighbourhood (for pricing)."""
    kh, kw = (int(x) for x in kernel)
    return max(1, -(-(kh * kw + 1) // 2))


def cascade(*, causal: bool = False, kernel=(7, 7), **kw):
    """Priced as the 1-D window that visits the same number of keys; a grid is never causal."""
    return sliding_window.cascade(causal=False, window=window_keys(kernel), **kw)


def _examples(n: int) -> list[dict]:
    """A grid after one global token that leaves a few global tokens after it too (awkward sizes)."""
    rows = max(1, int((n - 1) ** 0.5))
    cols = max(1, (n - 2) // rows)
    return [{"grid": [rows, cols], "kernel": [3, 3], "prefix": 1, "block": 8},
            {"grid": [rows, cols], "kernel": [1, 5], "prefix": 1, "block": 16}]


KERNEL = register(KernelVariant(
    name=VARIANT, kernel=kernel_fn, reference=reference,
    compiled_cpu=True,
    triton=TritonKernel("blockmap", ("grid", "kernel", "prefix", "block"), spec_params=_spec_params,
                        visible=triton_visible),
    cascade=cascade, cascade_params={"kernel": list, "block": int}, examples=_examples,
    degenerate=lambda n, e: {**_examples(n)[0], "kernel": [2 * n + 1, 2 * n + 1]}))
