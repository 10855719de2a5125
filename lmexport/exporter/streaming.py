"""`convert --streaming`: a checkpoint folder → the folder `convert` writes, in bounded memory.

Phases: `trace` builds the graph from fake weights (skeleton.py); `digest` reads every tensor
once for lmexport.json's weights sha256; `weights` casts (and transposes) each tensor from the
checkpoint into model.onnx.data; `quantize` (with --quantize) quantizes each MatMul weight a block
of rows at a time into its MatMulNBits initializers; `save` writes model.onnx, which holds the
graph and constants under 1 KiB, and checks it. Memory holds the trace, the source tensor being
written (a transposed weight is read whole, anything else a block of rows at a time) and one
block of float32 rows (weights_file.CHUNK_BYTES) with its temporaries.

The graph and the weights are the ones `convert` makes from the same folder, byte for byte. A
quantized streaming export does not measure its accuracy against the float graph (that needs the
whole float32 model in memory): lmexport.json records `quantization.accuracy` as null.
"""

from __future__ import annotations

import errno
import hashlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from ..errors import OutputError
from ..models.checkpoints.lazy import LazyCheckpoint, open_checkpoint
from ..onnx_files import EXTERNAL_DATA_THRESHOLD
from ..quantize import QuantizeOptions, check_quantizable, quantization_record
from ..quantize.graph import quantize_graph
from ..runtime.manifest import MODEL_FILE
from .compat import check_runnable
from .folder import copy_files, staged_folder, write_manifest
from .genai import write_genai_config
from .llama import OPSETS, graph_io, name_total_sequence
from .progress import Phase, Progress, human_bytes
from .skeleton import Skeleton, trace_skeleton
from .stand_in_quantize import StandInQuantizer
from .unused_outputs import drop_unused_outputs
from .weights_file import CHUNK_BYTES, DataFile, QuantizedWeight, write_quantized, write_recipe

DATA_FILE = MODEL_FILE + ".data"
# Initializers smaller than this stay inside model.onnx (onnx's own threshold for external data).
INLINE_BYTES = 1024
# `convert` streams on its own when a folder's weight files add up to more than this.
AUTO_STREAMING_BYTES = 2 * EXTERNAL_DATA_THRESHOLD
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def streams_by_default(source: str) -> bool:
    """A checkpoint folder whose weight files exceed AUTO_STREAMING_BYTES: loading it whole
    takes several times that in memory (the float32 model, then the traced graph's copy)."""
    folder = Path(source)
    if not folder.is_dir():
        return False
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    return size > AUTO_STREAMING_BYTES


def convert_streaming(
    source: str,
    outdir: Path,
    *,
    target: str,
    dtype: str,
    kv_cache: bool,
    force: bool,
    quantize: QuantizeOptions | None,
    progress: Progress,
) -> Path:
    """What `convert` writes for the folder `source`, one tensor at a time."""
    from .convert import DTYPES, fused_op_counts

    if quantize is not None:
        check_quantizable({"arch": "llama", "target": target, "dtype": dtype})
    with staged_folder(outdir, force, source=Path(source)) as stage:
        checkpoint = open_checkpoint(source)
        with progress.phase("trace"):
            skeleton = trace_skeleton(
                checkpoint.config, DTYPES[dtype], target, kv_cache, checkpoint.read
            )
        names = digest_names(checkpoint)
        with progress.phase("digest", len(names), _float32_bytes(checkpoint, names)) as phase:
            digest = weights_sha256(checkpoint, phase)
        quantization = None
        quantized: dict[str, QuantizedWeight] = {}
        if quantize is not None:
            quantized, quantization = _quantize(skeleton, quantize)
        _write_weights(skeleton, quantized, checkpoint, stage, outdir, progress)
        with progress.phase("save"):
            proto = ir.serde.serialize_model(skeleton.model)
            name_total_sequence(proto)
            drop_unused_outputs(proto)
            path = stage / MODEL_FILE
            try:
                onnx.save_model(proto, str(path))
            except OSError as e:
                raise _write_error(outdir, MODEL_FILE, e) from None
            onnx.checker.check_model(str(path), full_check=True)
            check_runnable(proto, target)
            copy_files(checkpoint.tokenizer_files(), stage)
            manifest: dict[str, Any] = {
                "arch": "llama",
                "config": checkpoint.config.to_dict(),
                "target": target,
                "dtype": dtype,
                "opset": OPSETS[target],
                "kv_cache": kv_cache,
                **graph_io(proto),
                "source": {
                    "kind": "folder",
                    "path": str(checkpoint.folder.resolve()),
                    "seed": None,
                    "weights_sha256": digest,
                },
                "passes": {"export": fused_op_counts(proto)},
                "quantization": quantization,
            }
            write_manifest(stage, manifest)
            if target == "ort" and kv_cache:
                write_genai_config(stage, manifest["config"])
    return outdir


def _quantize(
    skeleton: Skeleton, options: QuantizeOptions
) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """The graph rewritten as `convert --quantize` rewrites it, and lmexport.json's record."""
    quantizer = StandInQuantizer(skeleton.model.graph, skeleton.recipes)
    counts = quantize_graph(skeleton.model, options, quantizer)
    initializers = skeleton.model.graph.initializers
    skeleton.recipes = {n: r for n, r in skeleton.recipes.items() if n in initializers}
    record = quantization_record(options, counts, None)  # accuracy: see the module docstring
    return quantizer.collect(skeleton.model.graph), record


def _write_weights(
    skeleton: Skeleton,
    quantized: dict[str, QuantizedWeight],
    checkpoint: LazyCheckpoint,
    stage: Path,
    outdir: Path,
    progress: Progress,
) -> None:
    """Every initializer of at least INLINE_BYTES into DATA_FILE, each then pointing there."""
    initializers = skeleton.model.graph.initializers
    data = DataFile(stage / DATA_FILE)
    offsets = {}
    for name, value in initializers.items():
        nbytes = _nbytes(value)
        if name in skeleton.recipes or name in quantized or nbytes >= INLINE_BYTES:
            offsets[name] = data.allocate(nbytes)
    free = shutil.disk_usage(stage).free
    if free < data.size:
        data.close()
        raise OutputError(
            f"{outdir}: the weights need {human_bytes(data.size)}, the disk has "
            f"{human_bytes(free)} free"
        )
    plain = [n for n in offsets if n not in quantized]
    jobs = list({id(w): w for w in quantized.values()}.values())
    try:
        nbytes = sum(_nbytes(initializers[n]) for n in plain)
        with progress.phase("weights", len(plain), nbytes) as phase:
            for name in plain:
                recipe = skeleton.recipes.get(name)
                if recipe is not None:
                    write_recipe(recipe, checkpoint, data, offsets[name], _advance(phase))
                else:  # a constant of the trace, or a small weight read for the optimizer
                    tensor = initializers[name].const_value
                    raw = np.frombuffer(tensor.tobytes(), np.uint8)  # type: ignore[union-attr]
                    data.write(offsets[name], raw)
                    phase.advance(nbytes=raw.nbytes)
                phase.advance(tensors=1)
        if jobs:
            nbytes = sum(w.source_bytes for w in jobs)
            with progress.phase("quantize", len(jobs), nbytes) as phase:
                for weight in jobs:
                    weight.offsets = {part: offsets[n] for part, n in weight.parts.items()}
                    write_quantized(weight, checkpoint, data, _advance(phase))
                    phase.advance(tensors=1)
    except OSError as e:
        raise _write_error(outdir, DATA_FILE, e) from None
    finally:
        data.close()
    for name, offset in offsets.items():
        value = initializers[name]
        tensor = value.const_value
        assert tensor is not None
        value.const_value = ir.ExternalTensor(
            DATA_FILE,
            offset,
            tensor.nbytes,
            tensor.dtype,
            shape=tensor.shape,  # type: ignore[arg-type]
            name=name,
            base_dir=stage,
        )


def _nbytes(value: ir.Value) -> int:
    assert value.const_value is not None
    return value.const_value.nbytes


def _advance(phase: Phase) -> Callable[[int], None]:
    return lambda nbytes: phase.advance(nbytes=nbytes)


def _write_error(outdir: Path, name: str, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{outdir}: disk full while writing {name}")
    return OutputError(f"{outdir}: cannot write {name} ({e.strerror or e})")


def digest_names(checkpoint: LazyCheckpoint) -> list[str]:
    """The state_dict names `models.source.weights_sha256` walks: a tied LM head included."""
    tied = ["lm_head.weight"] if checkpoint.config.tie_word_embeddings else []
    return sorted([*checkpoint.shapes, *tied])


def _source_of(checkpoint: LazyCheckpoint, name: str) -> str:
    return name if name in checkpoint.shapes else "model.embed_tokens.weight"


def _float32_bytes(checkpoint: LazyCheckpoint, names: list[str]) -> int:
    return sum(4 * math.prod(checkpoint.shapes[_source_of(checkpoint, n)]) for n in names)


def weights_sha256(checkpoint: LazyCheckpoint, phase: Phase | None = None) -> str:
    """`models.source.weights_sha256` of the float32 model the folder loads into, a block of
    rows at a time."""
    digest = hashlib.sha256()
    for name in digest_names(checkpoint):
        source = _source_of(checkpoint, name)
        shape = checkpoint.shapes[source]
        digest.update(name.encode())
        step = max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            block = checkpoint.rows(source, start, min(start + step, shape[0]))
            data = block.to(torch.float32).contiguous().view(torch.uint8).numpy()
            digest.update(data.data)
            if phase is not None:
                phase.advance(nbytes=data.nbytes)
        if phase is not None:
            phase.advance(tensors=1)
    return digest.hexdigest()
