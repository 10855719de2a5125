"""Hugging Face-format Llama folders: `config.json` plus safetensors, single or sharded.

Everything read from the folder is checked before it is trusted: the config's keys and family,
every tensor's presence and shape (from the safetensors header, before any data is read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ...errors import ConfigError, SourceError, listed
from ..llama import Llama, LlamaConfig

LLAMA_MODEL_TYPES = ("llama",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)
# Buffers some exporters save that carry no weights of their own.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def _eos_ids(value: Any) -> list[Any]:
    """One id or a list of them, as a list; LlamaConfig checks that each is a token id."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def hf_config_json(config: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json as transformers 4.x writes it (rope_theta + rope_scaling), what
    `read_config` reads back: for test and benchmark checkpoints written from a config."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "torch_dtype": torch_dtype,
    }


def read_config(folder: Path) -> LlamaConfig:
    """A `LlamaConfig` from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) keys."""
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder}: no config.json (not a Hugging Face model folder)")
    raw = read_json(path)
    model_type = raw.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise SourceError(
            f"{path}: model_type {model_type!r} is not Llama-family "
            f"(supported: {', '.join(LLAMA_MODEL_TYPES)})"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise SourceError(f"{path}: hidden_act {act!r} is not supported (Llama uses silu)")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    missing = [k for k in (*required, "num_attention_heads") if k not in raw]
    if missing:
        raise SourceError(f"{path}: missing keys {', '.join(missing)}")

    def value(key: str, default: Any) -> Any:  # transformers writes null for unset keys
        got = raw.get(key)
        return default if got is None else got

    try:
        # transformers 5 keeps rope_theta inside rope_parameters; 4.x beside rope_scaling.
        rope_key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
        rope = value(rope_key, {})
        if not isinstance(rope, dict):
            raise SourceError(f"{path}: {rope_key} must be a JSON object, got {rope!r}")
        rope = dict(rope)
        rope_theta = rope.pop("rope_theta", value("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = _eos_ids(raw.get("eos_token_id"))
        gen_path = folder / "generation_config.json"
        if not eos and gen_path.is_file():
            eos = _eos_ids(read_json(gen_path).get("eos_token_id"))
        # LlamaConfig checks every value (types, signs, head counts, rope keys).
        config = LlamaConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads"),
            head_dim=raw.get("head_dim"),
            rms_norm_eps=value("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=value("max_position_embeddings", 2048),
            tie_word_embeddings=value("tie_word_embeddings", False),
            attention_bias=value("attention_bias", False),
            mlp_bias=value("mlp_bias", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
        )
    except ConfigError as e:
        raise SourceError(f"{path}: {e}") from None
    return config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SourceError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise SourceError(f"{index}: shard files missing: {', '.join(absent)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise SourceError(f"{folder}: only safetensors weights are read (found .bin/.pt files)")
    raise SourceError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_weights(folder: Path, model: Llama) -> None:
    """Copy the folder's tensors into `model`, refusing anything missing, extra or mis-shaped."""
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    seen: set[str] = set()
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                        continue
                    if name not in expected:
                        raise SourceError(f"{path.name}: unexpected tensor {name!r}")
                    shape = tuple(f.get_slice(name).get_shape())
                    want = tuple(expected[name].shape)
                    if shape != want:
                        raise SourceError(
                            f"{path.name}: tensor {name!r} has shape {list(shape)}, "
                            f"the config needs {list(want)}"
                        )
                    with torch.no_grad():
                        expected[name].copy_(f.get_tensor(name).to(expected[name].dtype))
                    seen.add(name)
        except SafetensorError as e:
            raise SourceError(f"{path}: unreadable safetensors file ({e})") from None
        except OSError as e:
            raise SourceError(f"{path}: {e}") from None
    needed = set(expected) - ({"lm_head.weight"} if tied else set())
    missing = sorted(needed - seen)
    if missing:
        raise SourceError(f"{folder}: missing tensors {listed(missing)}")


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
