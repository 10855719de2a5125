"""Reading an output folder's `lmexport.json` without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LmexportError, listed

MANIFEST = "lmexport.json"
MODEL_FILE = "model.onnx"
# The Llama graph input that limits the LM head to the last n positions, 0 meaning all
# (exporter/logits_to_keep.py).
LOGITS_TO_KEEP = "logits_to_keep"
SUPPORTED_FORMAT = 1
# What the runtime reads from lmexport.json, by architecture, and the type each must have.
_COMMON: dict[str, type] = {"config": dict, "target": str, "dtype": str, "source": dict}
_REQUIRED = {
    "llama": {**_COMMON, "kv_cache": bool},
    "hornet": {**_COMMON, "preprocess": dict},
}
# The Llama config fields that set the graph's tensor shapes: a `verify --source` that differs in
# one of them cannot be compared with the folder at all.
LLAMA_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)
# Inside those: the entries the runtime sizes its inputs and caches by, and that `verify`
# rebuilds and compares the source with (the rest are optional or only informative).
_REQUIRED_INSIDE: dict[str, dict[str, dict[str, type | tuple[type, ...]]]] = {
    "llama": {"config": dict.fromkeys((*LLAMA_SHAPE_FIELDS, "max_position_embeddings"), int)},
    "hornet": {
        "config": {"variant": str, "num_classes": int},
        "preprocess": {"image_size": int, "resize": (int, list), "mean": list, "std": list},
    },
}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise LmexportError(f"{folder}: not a folder written by `lmexport convert`")
    if not path.is_file():
        raise LmexportError(f"{folder}: no {MANIFEST} (not a folder written by `lmexport convert`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmexportError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != SUPPORTED_FORMAT:
        raise LmexportError(
            f"{path}: unsupported format_version (this lmexport reads {SUPPORTED_FORMAT})"
        )
    arch = manifest.get("arch")
    if arch not in _REQUIRED:
        raise LmexportError(f"{path}: unknown arch {arch!r} (choose from {', '.join(_REQUIRED)})")
    missing = [k for k, kind in _REQUIRED[arch].items() if not isinstance(manifest.get(k), kind)]
    if not missing:
        missing = [
            f"{outer}.{key}"
            for outer, fields in _REQUIRED_INSIDE[arch].items()
            for key, kind in fields.items()
            if not isinstance(manifest[outer].get(key), kind)
        ]
        source = manifest["source"]
        # `name` for a preset, `path` for a folder or file: what verify rebuilds.
        if not isinstance(source.get("name") or source.get("path"), str):
            missing.append("source.name or source.path")
    if missing:
        raise LmexportError(f"{path}: {listed(missing)} missing or of the wrong type")
    if not (folder / MODEL_FILE).is_file():
        raise LmexportError(f"{folder}: {MODEL_FILE} is missing")
    return manifest


def every_layer_grouped(manifest: dict[str, Any]) -> bool:
    """Whether every layer attends through com.microsoft::GroupQueryAttention, from what
    `convert` (op counts) and `optimize` (fusion counts, on top of its source's) recorded; a
    folder that records neither was, when its target is "ort". The target alone does not say
    it otherwise: `optimize` keeps the target it was asked for when the fusion refused a layer."""
    passes = manifest.get("passes")
    if not isinstance(passes, dict):
        return manifest.get("target") == "ort"
    exported = (passes.get("export") or {}).get("GroupQueryAttention", 0)
    fused = (passes.get("optimize") or {}).get("group_query_attention", 0)
    return int(exported) + int(fused) >= int(manifest["config"]["num_hidden_layers"])
