"""Weight surgery: K/V projections become per-head low-rank factors, or K/V heads merge in groups.

A site qualifies when its K and V each come from one ``nn.Linear`` (a parameter weight) through
view-only ops that split the output into heads the standard way ([B, M, G*E] -> [B, G, M, E]),
checked by replaying the ops on an index tensor. Factors come from the calibration activations:
per KV head, the top-R right singular vectors of the recorded K (and V) rows (PCA without
centring, so K ~ K·UKᵀ·UK). The surgery replaces the Linear on a copy of the model by
``down`` (W·UK per head, R outputs each) and ``rewriter::latent_up`` (UK); the model holds fewer
parameters. The attention op then reads the low-rank activations and applies UK/UV itself.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.fx as fx

from codegen.lowrank import LowRankLinear, MergedHeadsLinear
from passes import graph as G
from passes.calibrate import SiteRecord
from passes.operands import Operand
from passes.rotary import find_rotary

logger = logging.getLogger(__name__)

_VIEWS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "clone",
          "contiguous", "alias", "expand"}


@dataclass(frozen=True)
class Projection:
    """The Linear module that produces a site's K or V, and how its output splits into heads."""

    module: str  # dotted path of the nn.Linear in the model
    heads: int  # G
    head_dim: int  # E (or F)


def _chain_to_linear(node: fx.Node) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    chain: list[fx.Node] = []
    x = node
    for _ in range(16):
        name = G.opname(x)
        if name in G.LINEAR_OPS:
            return x, list(reversed(chain))
        if name not in _VIEWS and name not in G.CAST_OPS:
            return None
        chain.append(x)
        x = x.args[0]
    return None


def _standard_split(linear: fx.Node, chain: list[fx.Node], out_shape: tuple) -> Optional[tuple[int, int]]:
    """(G, E) when the chain turns [B, M, G*E] into [B, G, M, E] exactly, by replaying it on indices."""
    shp = G.shape(linear)
    if shp is None or len(shp) != 3 or len(out_shape) != 4:
        return None
    try:
        b, m, ge = (int(s) for s in shp)
        g, e = int(out_shape[1]), int(out_shape[3])
    except (TypeError, ValueError):
        return None
    if g * e != ge or int(out_shape[0]) != b or int(out_shape[2]) != m:
        return None
    x = torch.arange(b * m * ge).reshape(b, m, ge)
    try:
        for n in chain:
            if G.opname(n) in G.CAST_OPS:
                continue
            x = n.target(x, *n.args[1:], **{k: v for k, v in n.kwargs.items() if k != "memory_format"})
    except Exception:  # an op we cannot replay on indices: not provably the standard split
        return None
    want = torch.arange(b * m * ge).reshape(b, m, g, e).permute(0, 2, 1, 3)
    return (g, e) if tuple(x.shape) == tuple(want.shape) and torch.equal(x, want) else None


def find_projection(ep: torch.export.ExportedProgram, op_input: fx.Node,
                    model: Optional[torch.nn.Module] = None) -> tuple[Optional[Projection], str]:
    """The Linear feeding an attention op's K or V input, or (None, why not).

    With ``model``, the weight's owner must be an ``nn.Linear`` there: the surgery replaces that module.
    """
    found = _chain_to_linear(op_input)
    if found is None:
        return None, "it is not produced by a Linear through view-only ops (rotary embeddings or a norm sit between)"
    linear, chain = found
    weight = linear.args[1]
    params = ep.graph_signature.inputs_to_parameters
    if not isinstance(weight, fx.Node) or weight.name not in params:
        return None, "its projection weight is not a parameter"
    if len([u for u in weight.users if G.opname(u) != "_assert_tensor_metadata"]) != 1:
        return None, "its projection weight is shared with another op"
    split = _standard_split(linear, chain, G.shape(op_input))
    if split is None:
        return None, "its projection output is not split into heads as [B, M, G*E] -> [B, G, M, E]"
    fqn = params[weight.name]
    if not fqn.endswith(".weight"):
        return None, "its projection weight is not a module's weight"
    path = fqn[: -len(".weight")]
    if model is not None:
        try:
            owner = model.get_submodule(path)
        except AttributeError:
            owner = None
        if not isinstance(owner, torch.nn.Linear):
            return None, (f"its projection weight belongs to a {type(owner).__name__} module, not an nn.Linear "
                          "the surgery can replace")
    return Projection(path, *split), ""


def factors(records: Sequence[SiteRecord], which: str, rank: int) -> torch.Tensor:
    """Per-head basis [G, R, D] spanning the recorded K (or V) rows at meaningful positions."""
    rows = []
    for r in records:
        x = getattr(r, which).float()  # [B, G, M, D]
        if r.rows is not None and r.rows.shape[-1] == x.shape[2]:
            x = x.permute(0, 2, 1, 3)[r.rows].permute(1, 0, 2)  # [G, valid, D]
        else:
            x = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[-1])
        rows.append(x)
    allrows = torch.cat(rows, dim=1)
    # fewer rows than the rank: the full V completes the basis with orthonormal directions the rows do not use
    _, _, vh = torch.linalg.svd(allrows, full_matrices=allrows.shape[1] < rank)
    return vh[:, :rank].contiguous()


def project(x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Low-rank coordinates of x [B, G, M, D] in the basis up [G, R, D]: [B, G, M, R]."""
    return torch.einsum("bgmd,grd->bgmr", x.float(), up.float()).to(x.dtype)


def low_rank_linear(linear: torch.nn.Linear, proj: Projection, up: torch.Tensor) -> LowRankLinear:
    """The factored replacement of ``linear``: per head, W_g -> UK_g·W_g (down) and UK_g (up)."""
    g, r, e = up.shape
    w = linear.weight.detach().float().view(g, e, -1)
    down_w = torch.einsum("gre,gei->gri", up.float(), w).reshape(g * r, -1)
    down_b = None
    if linear.bias is not None:
        down_b = torch.einsum("gre,ge->gr", up.float(), linear.bias.detach().float().view(g, e)).reshape(-1)
    return LowRankLinear(down_w.to(linear.weight.dtype), None if down_b is None else down_b.to(linear.weight.dtype),
                         up.to(linear.weight.dtype))


def apply_latent(model: torch.nn.Module, surgeries: Sequence[tuple[Projection, torch.Tensor]]) -> torch.nn.Module:
    """A deep copy of ``model`` with each (projection, basis) Linear replaced by its low-rank factors."""
    out = copy.deepcopy(model)
    for proj, up in surgeries:
        parent_name, _, child = proj.module.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        linear = getattr(parent, child)
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{proj.module} is a {type(linear).__name__}, not a Linear")
        setattr(parent, child, low_rank_linear(linear, proj, up))
    return out


def merged_linear(linear: torch.nn.Linear, proj: Projection, groups: int) -> MergedHeadsLinear:
    """The K/V projection with adjacent heads merged ``G / groups`` at a time by averaging their weights."""
    g, e = proj.heads, proj.head_dim
    per = g // groups
    w = linear.weight.detach().view(groups, per, e, -1).mean(1).reshape(groups * e, -1)
    b = None if linear.bias is None else linear.bias.detach().view(groups, per, e).mean(1).reshape(-1)
    return MergedHeadsLinear(w, b, per, e)


def apply_merge(model: torch.nn.Module, merges: Sequence[tuple[Projection, int]]) -> torch.nn.Module:
    """A deep copy of ``model`` with each (projection, groups) Linear's heads merged."""
    out = copy.deepcopy(model)
    for proj, groups in merges:
        parent_name, _, child = proj.module.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, merged_linear(getattr(parent, child), proj, groups))
    return out


def merged_operand(op_input: fx.Node) -> Optional[Operand]:
    """In a graph of the merged model: the un-repeated heads [B, G', M, D] behind an op input."""
    x = op_input
    for _ in range(16):
        if G.opname(x) == "repeat_heads":
            low, d = x.args[0], int(x.args[2])
            b, m, gd = (int(v) for v in G.shape(low))
            return Operand(low, [("reshape", (b, m, gd // d, d)), ("permute", [0, 2, 1, 3])])
        if G.opname(x) not in _VIEWS and G.opname(x) not in G.CAST_OPS:
            return None
        x = x.args[0]
    return None


def latent_operand(op_input: fx.Node) -> Optional[tuple[Operand, fx.Node]]:
    """In a graph of the surgically changed model: the low-rank input of the latent_up feeding an op input.

    Returns (operand bringing [B, M, G*R] to [B, G, M, R], the up-projection's parameter node).
    """
    x = op_input
    for _ in range(16):
        if G.opname(x) == "latent_up":
            low, up = x.args[0], x.args[1]
            b, m = (int(d) for d in G.shape(low)[:2])
            g, r = (int(d) for d in G.shape(up)[:2])
            return Operand(low, [("reshape", (b, m, g, r)), ("permute", [0, 2, 1, 3])]), up
        if G.opname(x) not in _VIEWS and G.opname(x) not in G.CAST_OPS:
            return None
        x = x.args[0]
    return None


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


FITTED_PREFIX = "_rewriter_fitted"


def attach_fitted(model: torch.nn.Module, fitted: Sequence[tuple[int, Sequence[torch.Tensor]]]) -> torch.nn.Module:
    """A copy of ``model`` carrying each site's fitted tensors as buffers, so a capture holds them as constants."""
    out = copy.deepcopy(model)
    for site, tensors in fitted:
        for j, t in enumerate(tensors):
            out.register_buffer(f"{FITTED_PREFIX}_{site}_{j}", t.detach().clone())
    return out


def _fitted_nodes(ep: torch.export.ExportedProgram, site: int) -> tuple:
    by_fqn = {fqn: name for name, fqn in ep.graph_signature.inputs_to_buffers.items()}
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out, j = [], 0
    while f"{FITTED_PREFIX}_{site}_{j}" in by_fqn:
        out.append(nodes[by_fqn[f"{FITTED_PREFIX}_{site}_{j}"]])
        j += 1
    return tuple(out)


def rewrite_planned(ep: torch.export.ExportedProgram, matches: list, chosen: dict[int, tuple[str, dict]],
                    adaptive: Optional[dict[int, list]] = None) -> dict[int, str]:
    """Rewrite ``ep``'s sites by the plan: native windows drop their band, latent sites read low-rank K/V,
    fitted tensors (learned feature maps) come from the buffers ``attach_fitted`` added.

    ``adaptive`` maps a site to a length schedule (the op becomes ``adaptive`` there).
    """
    import dataclasses

    from passes.planner import drops_band
    from passes.rewrite import rewrite_graph
    from passes.variants import VARIANTS

    todo = []
    failures: dict[int, str] = {}
    for m in matches:
        if m.site.index not in chosen:
            continue
        variant, params = chosen[m.site.index]
        opts: dict = {"drop_band": drops_band(m.site, variant, params)}
        kind = VARIANTS[variant].weight_surgery if variant in VARIANTS else None
        if kind == "low_rank":
            rot = find_rotary(m.k.node)[0] if params.get("rope") else None
            if params.get("rope") and (rot is None or rot.form != params["rope"]):
                failures[m.site.index] = f"{variant}: the keys' rotary embedding is not visible in the captured graph"
                continue
            lk, lv = latent_operand(rot.key if rot is not None else m.k.node), latent_operand(m.v.node)
            if lk is None or lv is None:
                failures[m.site.index] = f"{variant}: the factored projections are not visible in the captured graph"
                continue
            m = dataclasses.replace(m, k=lk[0], v=lv[0], gqa_source=None, v_gqa_source=None)
            opts["extra"] = (lk[1], lv[1]) + ((rot.cos, rot.sin) if rot is not None else ())
        elif kind == "merge_heads":
            mk, mv = merged_operand(m.k.node), merged_operand(m.v.node)
            if mk is None or mv is None:
                failures[m.site.index] = f"{variant}: the merged projections are not visible in the captured graph"
                continue
            m = dataclasses.replace(m, k=mk, v=mv, gqa_source=None, v_gqa_source=None)
            params = {}  # the merged head count is K's own shape now
        else:
            fitted = _fitted_nodes(ep, m.site.index)
            if fitted:
                opts["extra"] = fitted
            if adaptive and m.site.index in adaptive:
                variant, params = "adaptive", {"schedule": adaptive[m.site.index]}
        todo.append((m, variant, params, opts))
    failures.update(rewrite_graph(ep.graph_module, todo))
    return failures
