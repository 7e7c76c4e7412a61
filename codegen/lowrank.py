"""``rewriter::latent_up``: the per-head up-projection of low-rank K/V activations.

After latent weight surgery a K (or V) projection is a rank-R down-projection per KV head followed
by this op: y[..., g, :] = x[..., g, :] @ up[g] for x [..., G*R] and up [G, R, E], giving the
[..., G*E] activation the model had. When the attention site is rewritten to ``latent`` the op is
bypassed: attention reads the low-rank x directly and applies ``up`` inside its kernel.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("rewriter::latent_up", mutates_args=())
def latent_up(x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per-head up-projection [..., G*R] x [G, R, E] -> [..., G*E]."""
    g, r, e = up.shape
    y = torch.einsum("...gr,gre->...ge", x.reshape(*x.shape[:-1], g, r), up.to(x.dtype))
    return y.reshape(*x.shape[:-1], g * e).contiguous()


@latent_up.register_fake
def _latent_up_fake(x, up):
    g, _, e = up.shape
    return x.new_empty((*x.shape[:-1], g * e))


class LowRankLinear(torch.nn.Module):
    """A K/V projection factored per head: ``down`` (in -> G*R) then ``latent_up`` (G*R -> G*E)."""

    def __init__(self, down_weight: torch.Tensor, down_bias: torch.Tensor | None, up: torch.Tensor):
        super().__init__()
        self.down = torch.nn.Linear(down_weight.shape[1], down_weight.shape[0], bias=down_bias is not None,
                                    dtype=down_weight.dtype, device=down_weight.device)
        with torch.no_grad():
            self.down.weight.copy_(down_weight)
            if down_bias is not None:
                self.down.bias.copy_(down_bias)
        self.up = torch.nn.Parameter(up.to(down_weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank approximation of the original projection's output."""
        return torch.ops.rewriter.latent_up(self.down(x), self.up)


# Planning only: candidate factors by key, so a planner can try ``latent`` on an unchanged graph (full K/V
# in, projected inside the op: the same math as the surgically changed model) before any surgery.
PROBES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _probe(q, k, v, mask, scale, causal, *, extra=(), softcap=0.0, fill=None, probe: str = "", rank: int = 0):
    from codegen.ops import run

    uk, uv = PROBES[probe]
    ck = torch.einsum("bgmd,grd->bgmr", k, uk.to(k.dtype))
    cv = torch.einsum("bgmd,grd->bgmr", v, uv.to(v.dtype))
    return run("latent", q, ck, cv, mask, scale, causal, extra=[uk.to(q.dtype), uv.to(q.dtype)], softcap=softcap,
               fill=fill, rank=rank)


def register_probe_kernel() -> None:
    """Register the planning-only ``latent_probe`` kernel (never written into an exported program)."""
    from codegen.ops import register_kernel

    register_kernel("latent_probe")(_probe)


def _with_extra(q, k, v, mask, scale, causal, *, extra=(), softcap=0.0, fill=None, probe: str = "", inner: str = "",
                **params):
    from codegen.ops import run

    return run(inner, q, k, v, mask, scale, causal, extra=list(PROBES[probe]), softcap=softcap, fill=fill, **params)


def register_extra_probe_kernel() -> None:
    """Register the planning-only ``extra_probe`` kernel: ``inner`` variant with fitted tensors looked up by key."""
    from codegen.ops import register_kernel

    register_kernel("extra_probe")(_with_extra)
