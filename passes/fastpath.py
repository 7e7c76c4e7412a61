"""Open up PyTorch's fused transformer fast paths so the attention inside them can be found.

In eval mode under torch.compile, ``nn.TransformerEncoderLayer`` calls one opaque op,
``torch._transformer_encoder_layer_fwd`` (and ``nn.MultiheadAttention`` may call
``torch._native_multi_head_attention``). These functions spell out the same math with ordinary ops
(SDPA for the attention) so tracing to ATen shows the attention like any other.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _additive(mask: Optional[torch.Tensor], mask_type: Optional[int], b: int, n: int, dtype) -> Optional[torch.Tensor]:
    """The fast path's merged mask as an additive [.., N, N] bias (True / -inf means masked)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    else:
        mask = mask.to(dtype)
    if mask_type == 1 or (mask.dim() == 2 and mask.shape == (b, n) and mask_type != 0):
        return mask.view(b, 1, 1, n)  # key padding
    return mask  # [N, N] src mask, or [B, H, N, N] merged


def _attention(x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, mask_type):
    b, n, _ = x.shape
    q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
    heads = lambda t: t.view(b, n, num_heads, embed_dim // num_heads).transpose(1, 2)  # noqa: E731
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                       attn_mask=_additive(mask, mask_type, b, n, x.dtype))
    return F.linear(y.transpose(1, 2).reshape(b, n, embed_dim), proj_weight, proj_bias)


def encoder_layer_math(
    src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first, eps,
    norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2,
    mask=None, mask_type=None,
):
    """The math of ``torch._transformer_encoder_layer_fwd`` (batch-first, eval) in ordinary ops."""
    ln1 = lambda t: F.layer_norm(t, (embed_dim,), norm_weight_1, norm_bias_1, eps)  # noqa: E731
    ln2 = lambda t: F.layer_norm(t, (embed_dim,), norm_weight_2, norm_bias_2, eps)  # noqa: E731
    act = F.gelu if use_gelu else F.relu

    def sa(t):
        return _attention(t, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, mask_type)

    def ff(t):
        return F.linear(act(F.linear(t, ffn_weight_1, ffn_bias_1)), ffn_weight_2, ffn_bias_2)

    if norm_first:
        x = src + sa(ln1(src))
        return x + ff(ln2(x))
    x = ln1(src + sa(src))
    return ln2(x + ff(x))


def native_mha_math(
    query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias, mask=None,
    need_weights=True, average_attn_weights=True, mask_type=None,
):
    """The math of ``torch._native_multi_head_attention`` for self-attention without returned weights."""
    if need_weights or not (query is key and key is value):
        raise NotImplementedError("native MHA opened only for self-attention without returned weights")
    out = _attention(query, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, mask_type)
    return out, torch.empty(0, dtype=out.dtype, device=out.device)


_REPLACEMENTS = {
    torch._transformer_encoder_layer_fwd: encoder_layer_math,
    torch._native_multi_head_attention: native_mha_math,
}


def open_fast_paths(gm: fx.GraphModule) -> int:
    """Point fused fast-path calls in a torch-level graph at their plain math; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _REPLACEMENTS:
            continue
        if node.target is torch._native_multi_head_attention:
            need = node.kwargs.get("need_weights", node.args[10] if len(node.args) > 10 else True)
            if need or not (node.args[0] is node.args[1] is node.args[2]):
                continue
        node.target = _REPLACEMENTS[node.target]
        count += 1
    if count:
        gm.recompile()
        logger.info("opened %d fused transformer fast path call(s)", count)
    return count
