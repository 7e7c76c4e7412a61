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


@torch.library.custom_op("rewriter::repeat_heads", mutates_args=())
def repeat_heads(x: torch.Tensor, repeats: int, head_dim: int) -> torch.Tensor:
    """[..., G'*D] -> [..., G'*repeats*D]: each merged head serves ``repeats`` original heads (gqa_merge)."""
    g = x.shape[-1] // head_dim
    y = x.reshape(*x.shape[:-1], g, 1, head_dim).expand(*x.shape[:-1], g, repeats, head_dim)
    return y.reshape(*x.shape[:-1], g * repeats * head_dim).contiguous()


@repeat_heads.register_fake
def _repeat_heads_fake(x, repeats, head_dim):
    return x.new_empty((*x.shape[:-1], x.shape[-1] * repeats))


class MergedHeadsLinear(torch.nn.Module):
    """A K/V projection whose heads were merged in groups: ``merged`` (in -> G'*D), repeated back to G*D."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, repeats: int, head_dim: int):
        super().__init__()
        self.merged = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                                      device=weight.device)
        with torch.no_grad():
            self.merged.weight.copy_(weight)
            if bias is not None:
                self.merged.bias.copy_(bias)
        self.repeats, self.head_dim = int(repeats), int(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The merged heads' projection, laid out as the original heads."""
        return torch.ops.rewriter.repeat_heads(self.merged(x), self.repeats, self.head_dim)
