"""Fit a learned feature map per head so linear attention mimics a site's softmax (Hedgehog).

φ(x) = [softmax(xW + b) ‖ softmax(−(xW + b))], one (W, b) per query head and per KV head, trained
on the calibration records to minimise the cross-entropy between the site's true attention
weights and the linear weights φ(q_i)·φ(k_j) / Σ_j φ(q_i)·φ(k_j) (Hedgehog's attention distillation;
the model itself stays frozen). Fitting is bounded in steps (deterministic) and shows a progress bar.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Optional, Sequence

import torch

from passes.calibrate import SiteRecord
from passes.masks import MASKED_BELOW

logger = logging.getLogger(__name__)


def _sample_rows(records: Sequence[SiteRecord], rows: int, seed: int = 0) -> list[tuple]:
    """(q rows [B,H,R,E], k [B,G,M,E], mask, causal positions) per record, with R sampled query rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in records:
        p = r.q.shape[2]
        idx = torch.randperm(p, generator=g)[: min(rows, p)].sort().values
        # clones: records made under inference_mode are inference tensors, which autograd cannot save
        out.append((r.q[:, :, idx].float().clone(), r.k.float().clone(), r.mask, r.causal, idx, r.scale))
    return out


def _phi(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    z = torch.einsum("bhne,hed->bhnd", x, w) + b[None, :, None, :]
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)


def fit_hedgehog(records: Sequence[SiteRecord], *, steps: int = 150, seconds: Optional[float] = None, rows: int = 128,
                 lr: float = 1e-2, progress: bool = True, desc: str = "hedgehog") -> list[torch.Tensor]:
    """Fitted ``[wq [H,E,E], bq [H,E], wk [G,E,E], bk [G,E]]`` for the linear kernel's ``hedgehog`` map.

    Bounded by ``steps``, so the same records give the same maps on a quiet or a busy machine (a plan
    must not change with the load); ``seconds`` adds a time bound for callers who accept that it may.
    Runs with gradients whatever the caller's mode (``no_grad``, ``inference_mode`` or grad disabled
    globally, as inference scripts do); the caller's mode is back in force when it returns.
    """
    # inference_mode(False) first: tensors made under inference mode cannot be saved for backward
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(records, steps=steps, seconds=seconds, rows=rows, lr=lr, progress=progress, desc=desc)


def _fit(records: Sequence[SiteRecord], *, steps: int, seconds: Optional[float], rows: int, lr: float, progress: bool,
         desc: str) -> list[torch.Tensor]:
    from tqdm.auto import tqdm

    h, e = records[0].q.shape[1], records[0].q.shape[-1]
    g = records[0].k.shape[1]
    rep = h // g
    # identity start: φ begins as softmax over the coordinates themselves (Hedgehog's initialisation)
    wq = torch.eye(e).repeat(h, 1, 1).requires_grad_()
    wk = torch.eye(e).repeat(g, 1, 1).requires_grad_()
    bq, bk = torch.zeros(h, e, requires_grad=True), torch.zeros(g, e, requires_grad=True)
    opt = torch.optim.Adam([wq, bq, wk, bk], lr=lr)
    data = _sample_rows(records, rows)
    targets = []
    for q, k, mask, causal, idx, scale in data:  # true attention weights at the sampled rows, computed once
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        s = (q @ kk.transpose(-1, -2)) * scale
        hide = _hidden(mask, causal, idx, k.shape[2], s)
        targets.append((s.masked_fill(hide, -math.inf).softmax(-1).nan_to_num(0.0), hide))
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    loss_v = float("nan")
    for step in range(steps):
        loss = 0.0
        for (q, k, _, _, _, _), (a, hide) in zip(data, targets):
            fq, fk = _phi(q, wq, bq), _phi(k, wk, bk)
            if rep > 1:
                fk = fk.repeat_interleave(rep, dim=1)
            lin = (fq @ fk.transpose(-1, -2)).masked_fill(hide, 0.0)
            lin = lin / lin.sum(-1, keepdim=True).clamp_min(1e-12)
            loss = loss - (a * lin.clamp_min(1e-12).log()).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.3f}")
        if seconds is not None and time.perf_counter() - t0 > seconds:
            logger.info("%s: stopped at step %d of %d (time bound %.0fs)", desc, step + 1, steps, seconds)
            break
    bar.close()
    logger.info("%s: attention cross-entropy %.4f", desc, loss_v)
    return [t.detach().contiguous() for t in (wq, bq, wk, bk)]


def _hidden(mask, causal: bool, idx: torch.Tensor, m: int, s: torch.Tensor) -> torch.Tensor:
    """Bool [.., R, M] of keys hidden from the sampled query rows (key padding and causality)."""
    hide = torch.zeros(s.shape[-2:], dtype=torch.bool)
    if causal:  # the op's causal is top-left: query i sees keys j <= i
        hide = torch.arange(m)[None, :] > idx[:, None]
    hide = hide.expand(s.shape)
    if mask is not None:
        mk = mask if mask.dtype == torch.bool else mask > MASKED_BELOW
        if mk.dim() == 4 and mk.shape[-2] == 1:
            hide = hide | ~mk.expand(s.shape[0], s.shape[1], 1, m)
        elif mk.dim() == 4:
            hide = hide | ~mk.index_select(-2, idx).expand(s.shape)
    return hide
