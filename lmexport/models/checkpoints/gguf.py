"""llama.cpp GGUF files of Llama-architecture models: metadata → config, tensors → fp32 weights,
the embedded tokenizer → `tokenizer.json` + `tokenizer_config.json`.

Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized to fp32 with the `gguf`
package, so the exported model computes what llama.cpp computes from the same file. llama.cpp's
converter permutes the rows of Q and K so its interleaved rotary gives the same result as Hugging
Face's rotate-half; we undo that permutation because our model rotates halves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import SourceError, listed
from ..llama import Llama, LlamaConfig
from .lazy import expected_shapes

SUPPORTED_ARCHS = ("llama",)
# GGUF tensor name (after `blk.N.`) → our parameter name (after `model.layers.N.`).
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's pre-tokenizer names → the `tokenizers` pre-tokenizer that splits text the same way.
GPT2_SPLIT = "gpt2"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": GPT2_SPLIT,
    "gpt2": GPT2_SPLIT,
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama-bpe": LLAMA3_SPLIT,
    "llama3": LLAMA3_SPLIT,
}


class GGUFFile:
    """An open GGUF file: typed metadata access and dequantized tensors by name."""

    def __init__(self, path: Path):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise SourceError("reading .gguf files needs the `gguf` package") from None
        try:
            self.reader = GGUFReader(str(path))
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise SourceError(f"{path}: not a readable GGUF file ({e})") from None
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise SourceError(f"{self.path}: GGUF metadata has no {key!r}")
        return value

    def tensor(self, name: str) -> np.ndarray:
        """fp32 array in PyTorch's [out_features, in_features] order (GGUF lists dims reversed)."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def read_config(gguf: GGUFFile) -> LlamaConfig:
    arch = gguf.require("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise SourceError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if "rope_freqs.weight" in gguf.tensors:
        raise SourceError(
            f"{gguf.path}: per-frequency rope factors (rope_freqs.weight, Llama 3.1 style) "
            "are not supported for GGUF files; convert the Hugging Face folder instead"
        )
    p = f"{arch}."
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab = gguf.get(p + "vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in gguf.tensors:
        vocab = gguf.tensors["token_embd.weight"].shape[1]
    if vocab is None:
        raise SourceError(f"{gguf.path}: no vocabulary size (no vocab_size, tokens or token_embd)")
    scaling_type = gguf.get(p + "rope.scaling.type", "none")
    rope_scaling: dict[str, Any] | None = None
    if scaling_type == "linear":
        rope_scaling = {
            "rope_type": "linear",
            "factor": float(gguf.require(p + "rope.scaling.factor")),
        }
    elif scaling_type not in ("none", None):
        raise SourceError(f"{gguf.path}: rope scaling {scaling_type!r} is not supported")
    eos = gguf.get("tokenizer.ggml.eos_token_id")
    bos = gguf.get("tokenizer.ggml.bos_token_id")
    key_length = gguf.get(p + "attention.key_length")  # absent: LlamaConfig derives it
    try:  # LlamaConfig checks the values (positive sizes, head counts, ...)
        heads = int(gguf.require(p + "attention.head_count"))
        config = LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=int(gguf.require(p + "embedding_length")),
            intermediate_size=int(gguf.require(p + "feed_forward_length")),
            num_hidden_layers=int(gguf.require(p + "block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(gguf.get(p + "attention.head_count_kv", heads)),
            head_dim=None if key_length is None else int(key_length),
            rms_norm_eps=float(gguf.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(gguf.get(p + "rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(gguf.get(p + "context_length", 2048)),
            tie_word_embeddings="output.weight" not in gguf.tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=[] if eos is None else [int(eos)],
        )
        rotary = gguf.get(p + "rope.dimension_count")
        rotary = None if rotary is None else int(rotary)
    except (TypeError, ValueError) as e:  # a value of the wrong type (text, a list) or range
        raise SourceError(f"{gguf.path}: {e}") from None
    if rotary is not None and rotary != config.head_dim:
        raise SourceError(
            f"{gguf.path}: rotary over {rotary} of each head's {config.head_dim} dimensions "
            "(partial rotary) is not supported"
        )
    return config


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (pair, half) back to (half, pair)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _parameter_name(name: str) -> str | None:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    return None


def check_tensors(gguf: GGUFFile, config: LlamaConfig) -> None:
    """Every tensor's name and shape, from the file's header, against what the metadata's model
    needs: before that model is allocated, since a small file can claim any size."""
    expected = expected_shapes(config)
    seen: set[str] = set()
    for name, tensor in gguf.tensors.items():
        target = _parameter_name(name)
        if target is None or target not in expected:
            raise SourceError(f"{gguf.path}: unexpected tensor {name!r}")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != expected[target]:
            raise SourceError(
                f"{gguf.path}: tensor {name!r} has shape {list(shape)}, "
                f"the metadata needs {list(expected[target])}"
            )
        seen.add(target)
    missing = sorted(set(expected) - seen)
    if missing:
        raise SourceError(f"{gguf.path}: missing tensors {listed(missing)}")


def load_weights(gguf: GGUFFile, model: Llama) -> None:
    """Copy every tensor (names and shapes checked by `check_tensors`) into `model`."""
    config = model.config
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    expected = model.state_dict()
    for name in gguf.tensors:
        target = _parameter_name(name)
        assert target is not None
        array = gguf.tensor(name)
        if target.endswith("q_proj.weight"):
            array = unpermute_rotary(array, config.num_attention_heads)
        elif target.endswith("k_proj.weight"):
            array = unpermute_rotary(array, kv_heads)
        with torch.no_grad():
            expected[target].copy_(torch.from_numpy(array))


def _pre_tokenizer(kind: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != LLAMA3_SPLIT)
    if kind == GPT2_SPLIT:
        return byte_level
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = pre_tokenizers.Split(Regex(kind), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, byte_level])


def tokenizer_files(gguf: GGUFFile) -> dict[str, str]:
    """`tokenizer.json` and `tokenizer_config.json` texts, or {} (with the reason on stderr) when
    the file's tokenizer is not a byte-level BPE we can rebuild exactly."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = gguf.get("tokenizer.ggml.model")
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        print(
            f"note: {gguf.path.name}: tokenizer {kind}/{pre} is not rebuilt; use --ids with it",
            file=sys.stderr,
        )
        return {}
    tokens: list[str] = list(gguf.require("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf.get("tokenizer.ggml.merges") or []]
    types = list(gguf.get("tokenizer.ggml.token_type") or [])
    split = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=split == LLAMA3_SPLIT))
    tokenizer.pre_tokenizer = _pre_tokenizer(split)
    tokenizer.decoder = decoders.ByteLevel()
    # CONTROL (3) and USER_DEFINED (4) tokens are matched whole, never split by the BPE.
    special = [t for t, kind_id in zip(tokens, types, strict=False) if kind_id in (3, 4)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def token(key: str) -> str | None:
        index = gguf.get(f"tokenizer.ggml.{key}_token_id")
        if index is None:
            return None
        if not isinstance(index, int) or not 0 <= index < len(tokens):
            raise SourceError(
                f"{gguf.path}: tokenizer.ggml.{key}_token_id {index!r} is not one of the "
                f"{len(tokens)} tokens"
            )
        return tokens[index]

    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", False))
    bos = token("bos")
    if add_bos and bos is not None:
        bos_id = int(gguf.require("tokenizer.ggml.bos_token_id"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    config = {
        "add_bos_token": add_bos,
        "bos_token": bos,
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "chat_template": gguf.get("tokenizer.chat_template"),
    }
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": json.dumps({k: v for k, v in config.items() if v is not None}),
    }


def load(path: Path) -> tuple[Llama, dict[str, str]]:
    """The model with the file's weights, and the tokenizer files to write beside it."""
    gguf = GGUFFile(path)
    config = read_config(gguf)
    check_tensors(gguf, config)
    model = Llama(config)
    load_weights(gguf, model)
    return model, tokenizer_files(gguf)
