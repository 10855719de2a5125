"""A Llama-family decoder (Llama 2/3, SmolLM, TinyLlama, ...) written for export.

Parameter names match Hugging Face's `LlamaForCausalLM` so its checkpoints load by name. One forward
path serves eager PyTorch, the KV-cache decode loop and `torch.onnx.export`: position ids come from
`attention_mask`, so left-padded batches need no extra input.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError

KVCache = list[tuple[Tensor, Tensor]]


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Hugging Face rope_scaling / rope_parameters without rope_theta: {"rope_type": "llama3", ...}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Check every value (each loader builds its config here, from untrusted files) and
        fill in the defaults, before any weight is allocated."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        heads = self.num_attention_heads = _positive_int(
            "num_attention_heads", self.num_attention_heads
        )
        kv_heads = self.num_key_value_heads
        kv_heads = heads if kv_heads is None else _positive_int("num_key_value_heads", kv_heads)
        self.num_key_value_heads = kv_heads
        if heads % kv_heads:
            raise ConfigError(
                f"num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of "
                    f"num_attention_heads ({heads})"
                )
            self.head_dim = self.hidden_size // heads
        self.head_dim = _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:  # rotary turns pairs of features
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        self.rms_norm_eps = _positive_number("rms_norm_eps", self.rms_norm_eps)
        self.rope_theta = _positive_number("rope_theta", self.rope_theta)
        _check_rope_scaling(self.rope_scaling)
        self.max_position_embeddings = _positive_int(
            "max_position_embeddings", self.max_position_embeddings
        )
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bos_token_id is not None:
            self.bos_token_id = _token_id("bos_token_id", self.bos_token_id)
        if not isinstance(self.eos_token_id, list):
            raise ConfigError(
                f"eos_token_id must be a list of token ids, got {self.eos_token_id!r}"
            )
        self.eos_token_id = [_token_id("eos_token_id", t) for t in self.eos_token_id]

    @property
    def n_kv_heads(self) -> int:
        assert self.num_key_value_heads is not None
        return self.num_key_value_heads

    @property
    def d_head(self) -> int:
        assert self.head_dim is not None
        return self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What each supported rope type needs besides its name (all positive numbers).
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings"),
}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_number(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _token_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name} must be a token id (an integer ≥ 0), got {value!r}")
    return int(value)


def _check_rope_scaling(scaling: Any) -> None:
    """The rope types `rope_inv_freq` reproduces, with every number it reads."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(
            f"rope_scaling must be a mapping such as {{'rope_type': 'linear', 'factor': 2.0}}, "
            f"got {scaling!r}"
        )
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_REQUIRED:
        raise ConfigError(
            f"unsupported rope type {rope_type!r} (supported: {', '.join(ROPE_REQUIRED)})"
        )
    for key in ROPE_REQUIRED[rope_type]:
        if key not in scaling:
            raise ConfigError(f"rope_scaling of type {rope_type!r} has no {key!r}")
        _positive_number(f"rope_scaling {key}", scaling[key])
    if rope_type == "llama3":
        low = _positive_number("rope_scaling low_freq_factor", scaling.get("low_freq_factor", 1.0))
        high = _positive_number(
            "rope_scaling high_freq_factor", scaling.get("high_freq_factor", 4.0)
        )
        if high <= low:
            raise ConfigError(
                f"rope_scaling high_freq_factor ({high}) must exceed low_freq_factor ({low})"
            )


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse frequencies, with the rope scaling types Llama checkpoints use in practice."""
    dim = config.d_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq.float()
    if rope_type == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # interpolated smoothly.
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(medium, smoothed, scaled).float()
    raise ConfigError(f"unsupported rope type {rope_type!r} (supported: default, linear, llama3)")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the model dtype, as the reference implementations do.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.d_head
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(out), present


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Decoder(nn.Module):
    """The body, named `model` inside `Llama` as in Hugging Face checkpoints."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    inv_freq: Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Llama:
        """`.to(float16)` would round the rotary frequencies with the weights, and a position
        times a rounded frequency drifts: 0.4 rad by position 8000 in float16, 3 in bfloat16.
        They stay float32, as transformers keeps them at any `from_pretrained` dtype."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Tensor, KVCache]:
        """Logits [batch, seq, vocab] (fp32) and the updated cache.

        `attention_mask` covers past and new tokens, [batch, past + seq], 0 on left padding.
        `logits_to_keep` > 0: logits of the last that many positions only, as the exported
        graph's input of that name (the LM head skips the others).
        """
        b, s = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + s, dtype=torch.int64, device=input_ids.device)
        total = attention_mask.shape[1]

        # Position of each token among the real (unpadded) tokens of its row.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, total - s :]
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.model.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        # Query i sits at cache index total - s + i and sees keys up to there, padding excluded.
        query_idx = torch.arange(s, device=input_ids.device) + (total - s)
        key_idx = torch.arange(total, device=input_ids.device)
        causal = key_idx.unsqueeze(0) <= query_idx.unsqueeze(1)
        mask = causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)

        presents: KVCache = []
        for i, layer in enumerate(self.model.layers):
            past = past_key_values[i] if past_key_values else None
            x, present = layer(x, cos, sin, mask, past)
            presents.append(present)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(x)).float()
        return logits, presents

    def empty_cache(self, batch: int) -> KVCache:
        """A cache with past length 0, the prefill input of the exported graph."""
        c = self.config
        shape = (batch, c.n_kv_heads, 0, c.d_head)
        dtype = self.lm_head.weight.dtype
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))] * len(
            self.model.layers
        )


def init_random(model: Llama, seed: int) -> None:
    """Seeded weights whose logits spread over several units, so greedy choices are unambiguous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if "embed_tokens" not in name else 1
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
