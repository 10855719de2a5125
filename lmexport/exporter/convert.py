"""`lmexport convert`: source → output folder (model.onnx, lmexport.json, tokenizer files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

from ..errors import LmexportError
from ..models.source import load_source
from .folder import copy_files, save_model, staged_folder, write_manifest
from .llama import PLAIN_OPSET, export_llama, graph_io

TARGETS = ("plain",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(
    source: str,
    outdir: str | Path,
    *,
    target: str = "plain",
    dtype: str = "float32",
    kv_cache: bool = True,
    seed: int | None = None,
    force: bool = False,
) -> Path:
    """Export `source` to `outdir`; returns the folder. Raises LmexportError on bad input."""
    if target not in TARGETS:
        raise LmexportError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if dtype not in DTYPES:
        raise LmexportError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    outdir = Path(outdir)
    with staged_folder(outdir, force) as stage:
        loaded = load_source(source, seed)
        source_record = loaded.source_record()
        model = loaded.model.to(DTYPES[dtype])
        proto = export_llama(model, kv_cache=kv_cache, opset=PLAIN_OPSET)
        onnx.checker.check_model(proto)
        save_model(proto, stage)
        copy_files(loaded.tokenizer_files, stage)
        manifest: dict[str, Any] = {
            "arch": loaded.arch,
            "config": model.config.to_dict(),
            "target": target,
            "dtype": dtype,
            "opset": PLAIN_OPSET,
            "kv_cache": kv_cache,
            **graph_io(proto),
            "source": source_record,
            "passes": {},
            "quantization": None,
        }
        write_manifest(stage, manifest)
    return outdir
