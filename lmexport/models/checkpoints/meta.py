"""Meta-format Llama folders (`params.json` + `consolidated.NN.pth`) and torchtune's checkpoints.

Meta's reference code shards a model for tensor parallelism and saves one `consolidated.NN.pth`
per rank: column-parallel weights (wq, wk, wv, w1, w3, output) are split by rows, row-parallel ones
(wo, w2) by columns, the token embedding by columns (Llama 2's ParallelEmbedding) or rows (Llama
3's VocabParallelEmbedding), and norms are replicated. torchtune saves the same tensors, unsharded,
either under Meta's names or under its own (`layers.N.attn.q_proj.weight`, `sa_norm.scale`, ...).

Both rotate (x[2i], x[2i+1]) pairs of each head (complex-number rotary); our model rotates
(x[i], x[i + head_dim/2]) halves as Hugging Face does. Reordering the rows of wq and wk per head
(evens first, then odds) makes the two compute the same attention scores exactly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ...errors import SourceError, listed
from ..llama import Llama, LlamaConfig
from .hf import read_json
from .hornet import read_state_dict

PARAMS = "params.json"
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps")
# LlamaConfig's field names → params.json's, for messages.
META_NAMES = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_seq_len",
    "intermediate_size": "the FFN width (from dim, multiple_of, ffn_dim_multiplier)",
}
SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# Llama 3.1's rotary scaling, which Meta's code applies when params.json sets use_scaled_rope.
# Its factor is 8 for every released model but Llama 3.2 1B and 3B, trained with 32 (their
# Hugging Face configs; Meta's reference code kept 8, meta-llama/llama-models#166 and #241):
# those two are the only ones whose embedding is also the LM head, so a tied checkpoint gets 32.
# A params.json that states `rope_scaling_factor` is taken at its word.
LLAMA32_SMALL_FACTOR = 32.0
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Files next to the weights that are not the model (torchtune's adapter and training state).
NOT_WEIGHTS = ("adapter_", "recipe_state")
IGNORED = ("rope.freqs",)  # Llama 2 saves its rotary table; we compute ours

# Per-layer tensor names (after `layers.N.`) in Meta's and torchtune's naming → ours (after
# `model.layers.N.`).
META_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TORCHTUNE_LAYER = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "sa_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
}
META_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TORCHTUNE_GLOBAL = {**META_GLOBAL, "norm.scale": "model.norm.weight"}
del TORCHTUNE_GLOBAL["norm.weight"]

# The dimension Meta's model parallelism splits each of our tensors along; None: replicated.
# The embedding's split depends on the Llama version and is read from the shard shapes.
SPLIT_DIM = {
    "self_attn.q_proj.weight": 0,
    "self_attn.k_proj.weight": 0,
    "self_attn.v_proj.weight": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
    "input_layernorm.weight": None,
    "post_attention_layernorm.weight": None,
    "model.norm.weight": None,
    "lm_head.weight": 0,
}


def is_meta_folder(folder: Path) -> bool:
    return (folder / PARAMS).is_file()


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta's FeedForward computes it: 2/3 of 4·dim, times the multiplier,
    rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_params(folder: Path) -> dict[str, Any]:
    path = folder / PARAMS
    raw = read_json(path)
    missing = [k for k in REQUIRED_PARAMS if k not in raw]
    if missing:
        raise SourceError(f"{path}: missing keys {', '.join(missing)}")
    return raw


def _int(raw: dict[str, Any], key: str, path: Path) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceError(f"{path}: {key} must be an integer, got {value!r}")
    return value


def _scaled_rope(raw: dict[str, Any], tied: bool) -> dict[str, Any]:
    default = LLAMA32_SMALL_FACTOR if tied else LLAMA31_ROPE["factor"]
    return {**LLAMA31_ROPE, "factor": raw.get("rope_scaling_factor", default)}


def config_from_params(
    raw: dict[str, Any], path: Path, vocab_size: int, tied: bool = False
) -> LlamaConfig:
    """`vocab_size` comes from the caller: Llama 2's params.json says -1 (the tokenizer's size),
    which the checkpoint's own shapes then give. `tied`: the checkpoint has no output weight
    (torchtune's Llama 3.2 shares the embedding)."""
    # LlamaConfig checks the sizes (positive, heads dividing dim and each other, an even head
    # width); its messages are put in params.json's names. `dim` and `multiple_of` are checked
    # here first because the FFN width is computed from them.
    dim, multiple_of = _int(raw, "dim", path), _int(raw, "multiple_of", path)
    if multiple_of <= 0:
        raise SourceError(f"{path}: multiple_of must be a positive integer, got {multiple_of}")
    scaled = bool(raw.get("use_scaled_rope", False))
    rope_theta = raw.get("rope_theta", 10000.0)  # Llama 2's files leave it out
    # Meta's code takes the context from its caller (max_seq_len); the released models were
    # trained to 4096 (Llama 2), 8192 (Llama 3), 131072 (Llama 3.1 on, scaled rotary).
    big_theta = isinstance(rope_theta, (int, float)) and rope_theta >= 500000
    context = 131072 if scaled else 8192 if big_theta else 4096
    ffn_multiplier = raw.get("ffn_dim_multiplier")
    if ffn_multiplier is not None and (
        isinstance(ffn_multiplier, bool) or not isinstance(ffn_multiplier, (int, float))
    ):
        raise SourceError(f"{path}: ffn_dim_multiplier must be a number, got {ffn_multiplier!r}")
    try:
        n_heads = raw["n_heads"]
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            intermediate_size=intermediate_size(
                dim, multiple_of, None if ffn_multiplier is None else float(ffn_multiplier)
            ),
            num_hidden_layers=raw["n_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads if raw.get("n_kv_heads") is None else raw["n_kv_heads"],
            rms_norm_eps=raw["norm_eps"],
            rope_theta=rope_theta,
            rope_scaling=_scaled_rope(raw, tied) if scaled else None,
            max_position_embeddings=raw.get("max_seq_len", context),
            tie_word_embeddings=tied,
        )
    except (TypeError, ValueError) as e:
        message = re.sub(r"\b\w+\b", lambda m: META_NAMES.get(m[0], m[0]), str(e))
        raise SourceError(f"{path}: {message}") from None


def weight_files(folder: Path) -> list[Path]:
    """Meta's shards, which must run consecutively from consolidated.00.pth, or the one
    checkpoint file torchtune writes (`model-00001-of-00001.bin`, `meta_model_0.pt`, ...)."""
    shards = sorted((int(m[1]), p) for p in folder.iterdir() if (m := SHARD.fullmatch(p.name)))
    if shards:
        numbers = [n for n, _ in shards]
        gaps = sorted(set(range(max(numbers) + 1)) - set(numbers))
        if gaps:
            names = ", ".join(f"consolidated.{n:02d}.pth" for n in gaps)
            raise SourceError(f"{folder}: missing shard {names} (shards must run from 00 on)")
        return [p for _, p in shards]
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".pth", ".pt", ".bin", ".safetensors")
        and p.is_file()
        and not p.name.startswith(NOT_WEIGHTS)
    )
    if not files:
        raise SourceError(f"{folder}: {PARAMS} but no consolidated.00.pth or checkpoint file")
    if len(files) > 1:
        raise SourceError(
            f"{folder}: several checkpoint files ({', '.join(p.name for p in files)}); expected "
            "consolidated.NN.pth shards or a single file"
        )
    return files


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix != ".safetensors":
        return read_state_dict(path)  # torch.load(weights_only=True), memory-mapped
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SourceError(f"{path}: unreadable safetensors file ({e})") from None


def _naming(torchtune: bool) -> tuple[dict[str, str], dict[str, str]]:
    return (TORCHTUNE_LAYER, TORCHTUNE_GLOBAL) if torchtune else (META_LAYER, META_GLOBAL)


def _is_torchtune(state: dict[str, Tensor]) -> bool:
    return "norm.scale" in state  # the final norm's name tells the two namings apart


def _rename(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], bool]:
    """The file's tensors under our parameter names, and whether it uses torchtune's naming."""
    torchtune = _is_torchtune(state)
    layer_names, global_names = _naming(torchtune)
    renamed: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in IGNORED:
            continue
        ours = global_names.get(name)
        if ours is None and (m := re.fullmatch(r"layers\.(\d+)\.(.+)", name)):
            suffix = layer_names.get(m[2])
            ours = None if suffix is None else f"model.layers.{int(m[1])}.{suffix}"
        if ours is None:
            style = "torchtune" if torchtune else "Meta"
            raise SourceError(f"{path.name}: unexpected tensor {name!r} (read as {style} naming)")
        renamed[ours] = tensor
    return renamed, torchtune


def _their_name(ours: str, torchtune: bool) -> str:
    """A parameter's name in the file's naming, for messages."""
    layer_names, global_names = _naming(torchtune)
    theirs = {v: k for k, v in global_names.items()}.get(ours)
    if theirs is None and (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", ours)):
        suffix = {v: k for k, v in layer_names.items()}.get(m[2])
        theirs = None if suffix is None else f"layers.{m[1]}.{suffix}"
    return theirs or ours


def _split_dim(name: str, full: tuple[int, ...], part: tuple[int, ...]) -> int | None:
    if name == "model.embed_tokens.weight":  # by rows (Llama 3) or columns (Llama 2)
        return 1 if part[0] == full[0] and part[1] != full[1] else 0
    return SPLIT_DIM[name.split(".", 3)[-1] if name.startswith("model.layers.") else name]


def _join(
    name: str, parts: list[Tensor], want: tuple[int, ...], files: list[Path], label: str
) -> Tensor:
    """The whole tensor from its shards, shapes checked against the config first. `label` is
    its name in the files."""
    n = len(parts)
    part = tuple(parts[0].shape)
    for p, f in zip(parts, files, strict=True):
        if tuple(p.shape) != part:
            raise SourceError(
                f"{f.name}: tensor {label!r} has shape {list(p.shape)}, other shards {list(part)}"
            )
    if len(part) != len(want):
        raise SourceError(
            f"{files[0].name}: tensor {label!r} has shape {list(part)}, "
            f"params.json needs {list(want)}"
        )
    dim = _split_dim(name, want, part)
    got = list(part)
    if dim is not None:
        got[dim] *= n
    if tuple(got) == want:
        return parts[0] if dim is None else torch.cat(parts, dim=dim)
    held = want[dim] // part[dim] if dim is not None and part[dim] else 0
    if (
        dim is not None
        and held > n
        and held * part[dim] == want[dim]
        and all(a == b for i, (a, b) in enumerate(zip(part, want, strict=True)) if i != dim)
    ):
        absent = f"consolidated.{n:02d}.pth" + (
            f" to consolidated.{held - 1:02d}.pth" if held - n > 1 else ""
        )
        raise SourceError(
            f"{files[0].parent}: missing shard {absent} ({label!r} in each of the {n} "
            f"found is 1/{held} of its shape {list(want)})"
        )
    where = files[0].name if n == 1 else f"{n} shards"
    raise SourceError(
        f"{where}: tensor {label!r} adds up to shape {got}, params.json needs {list(want)}"
    )


def interleaved_to_halves(weight: Tensor, heads: int) -> Tensor:
    """Rows of a Q or K projection reordered per head from Meta's (pair, 2) layout to
    (2, pair): the rotate-half form computing the same rotations. What Hugging Face's
    convert_llama_weights_to_hf does."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _vocab_size(raw: dict[str, Any], shards: list[dict[str, Tensor]], path: Path) -> int:
    vocab = raw["vocab_size"]
    if isinstance(vocab, bool) or not isinstance(vocab, int) or (vocab <= 0 and vocab != -1):
        raise SourceError(f"{path}: vocab_size must be a positive integer or -1, got {vocab!r}")
    if vocab != -1:
        return vocab
    if "lm_head.weight" in shards[0]:
        return sum(s["lm_head.weight"].shape[0] for s in shards)
    if "model.embed_tokens.weight" in shards[0]:
        rows = [int(s["model.embed_tokens.weight"].shape[0]) for s in shards]
        split_by_rows = shards[0]["model.embed_tokens.weight"].shape[1] == raw["dim"]
        return sum(rows) if split_by_rows else rows[0]
    raise SourceError(f"{path}: vocab_size is -1 and the checkpoint has no embedding to size it")


def load(folder: Path) -> Llama:
    """The model a Meta or torchtune folder holds, every tensor checked by name and shape."""
    path = folder / PARAMS
    raw = read_params(folder)
    files = weight_files(folder)
    renamed = [_rename(_read(f), f) for f in files]
    shards, styles = [r[0] for r in renamed], [r[1] for r in renamed]
    tied = not any("lm_head.weight" in s for s in shards)
    config = config_from_params(raw, path, _vocab_size(raw, shards, path), tied)
    model = Llama(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    for f, s, torchtune in zip(files, shards, styles, strict=True):
        missing = [_their_name(k, torchtune) for k in expected if k not in s]
        if missing:
            raise SourceError(f"{f.name}: missing tensors {listed(missing)}")
        extra = [_their_name(k, torchtune) for k in s if k not in expected]
        if extra:
            raise SourceError(
                f"{f.name}: unexpected tensor {extra[0]!r} ({PARAMS} says n_layers "
                f"{config.num_hidden_layers})"
            )
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.n_kv_heads}
    with torch.no_grad():
        for name, target in expected.items():
            parts = [s[name] for s in shards]
            label = _their_name(name, styles[0])
            tensor = _join(name, parts, tuple(target.shape), files, label)
            projection = name.split(".")[-2]
            if projection in heads:
                tensor = interleaved_to_halves(tensor, heads[projection])
            target.copy_(tensor.to(target.dtype))
    return model
