"""`lmexport convert`: source → output folder (model.onnx, lmexport.json, tokenizer files)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import torch

from ..errors import LmexportError
from ..models.hornet import HorNet
from ..models.presets import PRESETS
from ..models.source import load_source
from ..quantize import QuantizeOptions, as_options, check_quantizable, quantize_into
from .compat import check_runnable
from .convert_hornet import convert_hornet
from .folder import copy_files, save_model, staged_folder, write_manifest
from .genai import write_genai_config
from .llama import OPSETS, export_llama, graph_io
from .progress import Progress
from .streaming import convert_streaming, streams_by_default

TARGETS = tuple(OPSETS)
# Ops that stand for a whole fused subgraph; their counts go to lmexport.json's `passes`.
FUSED_OPS = (
    "GroupQueryAttention",
    "Attention",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "RotaryEmbedding",
    "QuickGelu",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(
    source: str,
    outdir: str | Path,
    *,
    target: str = "ort",
    dtype: str = "float32",
    kv_cache: bool = True,
    seed: int | None = None,
    force: bool = False,
    arch: str | None = None,
    image_size: int | None = None,
    adapter: str | Path | None = None,
    quantize: str | QuantizeOptions | None = None,
    streaming: bool | None = None,
    progress: bool = False,
) -> Path:
    """Export `source` to `outdir`; returns the folder. Raises LmexportError on bad input.

    `seed` sets a preset's random weights (other sources are refused with one);
    `arch` names a checkpoint file's architecture; `image_size` is a HorNet model's input size;
    `adapter` is a PEFT LoRA folder merged into the weights before export; `quantize` is
    "int4", "int8" or `QuantizeOptions` (weight-only, accuracy recorded in lmexport.json);
    `streaming` converts a checkpoint folder one tensor at a time (exporter/streaming.py), by
    default when its weight files exceed 2 GiB; `progress` shows its phases on stderr.
    """
    quantize = as_options(quantize)
    if target not in TARGETS:
        raise LmexportError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if dtype not in DTYPES:
        raise LmexportError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    preset = PRESETS.get(str(source))
    if seed is not None and preset is None:
        raise LmexportError(f"--seed is for presets (seeded random weights); {source} is not one")
    # HorNet models are its presets and the checkpoint files `--arch` names: known before a
    # (maybe large, maybe streaming) Llama is loaded.
    if image_size is not None and arch is None and (preset is None or preset.arch != "hornet"):
        raise LmexportError("--image-size applies to HorNet models only")
    outdir = Path(outdir)
    if streaming is None:
        streaming = adapter is None and arch is None and streams_by_default(source)
    if streaming:
        if adapter is not None or arch is not None or image_size is not None:
            raise LmexportError(
                "--streaming converts Llama checkpoint folders as they are "
                "(no --adapter, --arch or --image-size)"
            )
        return convert_streaming(
            source, outdir, target=target, dtype=dtype, kv_cache=kv_cache, force=force,
            quantize=quantize, progress=Progress(progress),
        )  # fmt: skip
    with staged_folder(outdir, force, source=source, adapter=adapter) as stage:
        loaded = load_source(source, seed, arch, adapter)
        if quantize is not None:
            check_quantizable({"arch": loaded.arch, "target": target, "dtype": dtype})
        if isinstance(loaded.model, HorNet):
            if not kv_cache:
                raise LmexportError("--no-kv-cache applies to Llama models only")
            write_manifest(stage, convert_hornet(loaded, stage, target, dtype, image_size))
            return outdir
        source_record = loaded.source_record()
        model = loaded.model.to(DTYPES[dtype])
        proto = export_llama(model, target, kv_cache=kv_cache)
        check_runnable(proto, target)
        copy_files(loaded.tokenizer_files, stage)
        for name, text in loaded.tokenizer_texts.items():
            (stage / name).write_text(text)
        manifest: dict[str, Any] = {
            "arch": loaded.arch,
            "config": model.config.to_dict(),
            "target": target,
            "dtype": dtype,
            "opset": OPSETS[target],
            "kv_cache": kv_cache,
            **graph_io(proto),
            "source": source_record,
            "passes": {"export": fused_op_counts(proto)},
            "quantization": None,
        }
        if quantize is not None:
            proto = quantize_into(proto, quantize, manifest, stage)
        save_model(proto, stage)
        write_manifest(stage, manifest)
        if target == "ort" and kv_cache:
            write_genai_config(stage, manifest["config"])
    return outdir


def fused_op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(n.op_type for n in proto.graph.node if n.op_type in FUSED_OPS)
    return dict(sorted(counts.items()))
