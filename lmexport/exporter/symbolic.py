"""Fused ONNX ops emitted while tracing, one function per op and target.

Each function is only called under `torch.onnx.is_in_onnx_export()`: `torch.onnx.ops.symbolic`
records a node of the named op with the given output dtype and shape, and the opset-23 helpers
record the standard op. None of them computes anything in eager mode.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

# -- onnxruntime contrib ops (`ort` target) ------------------------------------------------------


def skip_simplified_layer_norm(
    x: Tensor, skip: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """RMSNorm of `x + skip` and that sum (the residual stream), in one op."""
    b, s, _ = x.shape
    out, _mean, _inv_std, total = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::SkipSimplifiedLayerNormalization",
        [x, skip, weight],
        attrs={"epsilon": eps},
        dtypes=[x.dtype, torch.float32, torch.float32, x.dtype],
        shapes=[x.shape, [b, s, 1], [b, s, 1], x.shape],
        version=1,
    )
    return out, total


def silu(x: Tensor) -> Tensor:
    """x · sigmoid(x) as one node: com.microsoft::QuickGelu with alpha 1 is exactly SiLU."""
    return torch.onnx.ops.symbolic(
        "com.microsoft::QuickGelu",
        [x],
        attrs={"alpha": 1.0},
        dtype=x.dtype,
        shape=x.shape,
        version=1,
    )


def rotary_embedding_ort(
    x: Tensor, position_ids: Tensor, cos: Tensor, sin: Tensor, num_heads: int
) -> Tensor:
    """Rotate-half rotary on [batch, seq, heads * head_dim]; caches are [max_pos, head_dim / 2]."""
    return torch.onnx.ops.symbolic(
        "com.microsoft::RotaryEmbedding",
        [x, position_ids, cos, sin],
        attrs={"num_heads": num_heads, "interleaved": 0},
        dtype=x.dtype,
        shape=x.shape,
        version=1,
    )


def group_query_attention(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    past_key: Tensor,
    past_value: Tensor,
    seqlens_k: Tensor,
    total_length: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    bias: Tensor,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_dim: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """com.microsoft::GroupQueryAttention with a KV cache (present = past + new, not shared).

    `query` alone (key/value None) is the packed [q | k | v] projection. Rotary is applied inside
    the op when cos/sin are given, at cache-slot positions.
    """
    b, s = query.shape[0], query.shape[1]
    present = [b, kv_num_heads, past_key.shape[2] + s, head_dim]
    out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        # 9 position_ids, 11 head_sink, 12-15 quantisation scales and q/k norms: not used.
        [
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total_length,
            cos,
            sin,
            None,
            bias,
        ],
        attrs={
            "num_heads": num_heads,
            "kv_num_heads": kv_num_heads,
            "scale": scale,
            "do_rotary": int(cos is not None),
            "rotary_interleaved": 0,
        },
        dtypes=[query.dtype] * 3,
        shapes=[[b, s, num_heads * head_dim], present, present],
        version=1,
    )
    return out, present_key, present_value


# -- ONNX opset 23 (`onnx` target) ---------------------------------------------------------------


def rms_normalization(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Exported as a single RMSNormalization node at opset ≥ 23. The `ort` target uses it too,
    for the one norm without a residual: onnxruntime's SimplifiedLayerNormalization sits in the
    default domain where onnx's checker rejects it."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotary_embedding_23(
    x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor, num_heads: int
) -> Tensor:
    return torch.onnx.ops.rotary_embedding(x, cos, sin, position_ids, num_heads=num_heads)


def attention_23(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    past_key: Tensor | None,
    past_value: Tensor | None,
    *,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention-23 on 3-D q/k/v; `mask` is boolean [batch, 1, seq, total] (True = attend)."""
    out, present_key, present_value, _ = torch.onnx.ops.attention(
        q,
        k,
        v,
        mask,
        past_key,
        past_value,
        q_num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        scale=scale,
    )
    return out, present_key, present_value
