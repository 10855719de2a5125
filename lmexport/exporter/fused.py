"""The decoder forward written with fused ops, one per target, for export only.

`FusedLlama` wraps an eager `Llama` and reads its weights. While `torch.onnx.export` traces it,
its forward emits `ort` (contrib) or `onnx` (opset 23) fused ops; anywhere else it is the eager
model, so PyTorch behaviour is unchanged.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models.llama import Block, KVCache, Llama
from . import symbolic as op


def rotary_caches(model: Llama) -> tuple[Tensor, Tensor]:
    """cos/sin for every position, [max_position_embeddings, head_dim / 2], as ONNX rotary ops
    want them (not Hugging Face's duplicated halves)."""
    positions = torch.arange(model.config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, model.inv_freq.float())
    dtype = model.lm_head.weight.dtype
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


class FusedLlama(nn.Module):
    """`rotary` (ort only): "inside" GroupQueryAttention, or "before" it as RotaryEmbedding ops.
    onnxruntime's CPU kernel rotates inside only for head_dim a multiple of 16; "auto" picks."""

    cos: Tensor
    sin: Tensor

    def __init__(self, model: Llama, target: str, rotary: str = "auto") -> None:
        super().__init__()
        if target not in ("ort", "onnx"):
            raise ValueError(f"no fused forward for target {target!r}")
        if rotary not in ("auto", "inside", "before"):
            raise ValueError(f"rotary must be auto, inside or before, not {rotary!r}")
        self.eager = model
        self.target = target
        self.blocks = [cast(Block, block) for block in model.model.layers]
        c = model.config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.n_kv_heads, c.d_head
        self.eps = c.rms_norm_eps
        if rotary == "auto":
            rotary = "inside" if self.head_dim % 16 == 0 else "before"
        self.rotary_inside = rotary == "inside"
        self.scale = 1.0 / math.sqrt(self.head_dim)
        cos, sin = rotary_caches(model)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # One MatMul for Q, K and V instead of three (ort, rotary inside): one pass over h.
        self.qkv = nn.ParameterList()
        self.qkv_bias = nn.ParameterList()
        for block in self.blocks if self.rotary_inside else []:
            a = block.self_attn
            self.qkv.append(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            if a.q_proj.bias is not None:
                self.qkv_bias.append(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, past_key_values: KVCache | None = None
    ) -> tuple[Tensor, KVCache]:
        if not torch.onnx.is_in_onnx_export():
            return self.eager(input_ids, attention_mask, past_key_values)
        if self.target == "onnx":
            # Attention-23 takes no past at all without a cache (onnxruntime refuses a past
            # whose present output is unused).
            return self._onnx(input_ids, attention_mask, past_key_values)
        if past_key_values is None:  # --no-kv-cache: GroupQueryAttention needs an (empty) past
            b = input_ids.shape[0]
            empty = torch.zeros(b, self.n_kv, 0, self.head_dim, dtype=self.cos.dtype)
            past_key_values = [(empty, empty)] * len(self.blocks)
        return self._ort(input_ids, attention_mask, past_key_values)

    def _mlp(self, i: int, h: Tensor) -> Tensor:
        mlp = self.blocks[i].mlp
        silu = op.silu if self.target == "ort" else F.silu
        return mlp.down_proj(silu(mlp.gate_proj(h)) * mlp.up_proj(h))

    def _ort(self, ids: Tensor, mask: Tensor, past: KVCache) -> tuple[Tensor, KVCache]:
        model = self.eager.model
        b, s = ids.shape
        total = mask.shape[1]
        # Every cache slot counts as valid (seqlens_k = total - 1) and left padding is masked by
        # the additive bias: GroupQueryAttention's own lengths assume right padding. Rotary then
        # runs at slot positions, which changes no attention score (rotary is relative).
        seqlens_k = torch.full((b,), total - 1, dtype=torch.int32)
        total_length = torch.full((), total, dtype=torch.int32)
        dtype = self.cos.dtype
        bias = torch.where(mask.bool(), 0.0, torch.finfo(dtype).min).to(dtype)
        bias = bias[:, None, None, :].expand(b, 1, s, total)
        if not self.rotary_inside:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, total - s :]

        x = model.embed_tokens(ids)
        residual: Tensor | None = None
        presents: KVCache = []
        for i, layer in enumerate(self.blocks):
            w = layer.input_layernorm.weight
            if residual is None:  # the first norm has no residual to add yet
                h, residual = op.rms_normalization(x, w, self.eps), x
            else:
                h, residual = op.skip_simplified_layer_norm(x, residual, w, self.eps)
            a = layer.self_attn
            if self.rotary_inside:
                bias_qkv = self.qkv_bias[i] if len(self.qkv_bias) else None
                q, k, v = F.linear(h, self.qkv[i], bias_qkv), None, None
                cos, sin = self.cos, self.sin
            else:
                q = op.rotary_embedding_ort(
                    a.q_proj(h), positions, self.cos, self.sin, self.n_heads
                )
                k = op.rotary_embedding_ort(a.k_proj(h), positions, self.cos, self.sin, self.n_kv)
                v, cos, sin = a.v_proj(h), None, None
            out, pk, pv = op.group_query_attention(
                q, k, v, past[i][0], past[i][1], seqlens_k, total_length, cos, sin, bias,
                num_heads=self.n_heads, kv_num_heads=self.n_kv,
                head_dim=self.head_dim, scale=self.scale,
            )  # fmt: skip
            presents.append((pk, pv))
            x = a.o_proj(out)
            w = layer.post_attention_layernorm.weight
            h, residual = op.skip_simplified_layer_norm(x, residual, w, self.eps)
            x = self._mlp(i, h)
        assert residual is not None
        h, _ = op.skip_simplified_layer_norm(x, residual, model.norm.weight, self.eps)
        return self.eager.lm_head(h).float(), presents

    def _onnx(self, ids: Tensor, mask: Tensor, past: KVCache | None) -> tuple[Tensor, KVCache]:
        model = self.eager.model
        b, s = ids.shape
        total = mask.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, total - s :]
        query_idx = torch.arange(s) + (total - s)
        causal = torch.arange(total)[None, :] <= query_idx[:, None]
        # onnxruntime's Attention-23 wants the mask's query axis spelled out, not broadcast.
        allowed = (causal[None, None] & mask.bool()[:, None, None, :]).expand(b, 1, s, total)

        x = model.embed_tokens(ids)
        presents: KVCache = []
        for i, layer in enumerate(self.blocks):
            a = layer.self_attn
            h = op.rms_normalization(x, layer.input_layernorm.weight, self.eps)
            q = op.rotary_embedding_23(a.q_proj(h), self.cos, self.sin, positions, self.n_heads)
            k = op.rotary_embedding_23(a.k_proj(h), self.cos, self.sin, positions, self.n_kv)
            out, pk, pv = op.attention_23(
                q, k, a.v_proj(h), allowed, *(past[i] if past else (None, None)),
                num_heads=self.n_heads, kv_num_heads=self.n_kv, scale=self.scale,
            )  # fmt: skip
            presents.append((pk, pv))
            x = x + a.o_proj(out)
            h = op.rms_normalization(x, layer.post_attention_layernorm.weight, self.eps)
            x = x + self._mlp(i, h)
        h = op.rms_normalization(x, model.norm.weight, self.eps)
        return self.eager.lm_head(h).float(), presents
