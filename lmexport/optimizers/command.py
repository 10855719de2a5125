"""`lmexport optimize IN.onnx -o OUT.onnx`: load, fuse, prove the result computes the same, write.

The proof (`check.check_same`) runs both graphs in onnxruntime on generated inputs of the
graph's own shapes; a result that differs is never written.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from ..errors import LmexportError
from ..onnx_files import load_onnx, save_onnx, umask_mode
from ..quantize import QuantizeOptions, as_options, check_quantizable, quantize_into
from .check import MIN_POSITIONS, check_same
from .hornet_pipeline import is_image_model, optimize_image_model
from .pipeline import MAX_POSITIONS, optimize_model
from .report import Report


def optimize_file(
    source: Path,
    output: Path,
    target: str,
    check: bool = True,
    tolerance: float | None = None,
    quantize: str | QuantizeOptions | None = None,
    force: bool = False,
    max_positions: int | None = None,
) -> Report:
    """SOURCE an ONNX file → OUTPUT file, or SOURCE a `convert` folder → OUTPUT folder;
    `quantize` (folders only: their lmexport.json records the accuracy) as for `convert`;
    `force` replaces an existing OUTPUT; `tolerance` for the parity check, by default
    `default_tolerance(graph)`; `max_positions` the rows of a rotary cache built from angles the
    graph computes (by default the folder's context, MAX_POSITIONS for a file)."""
    if max_positions is not None and max_positions < MIN_POSITIONS:
        raise LmexportError(f"--max-positions {max_positions}: at least {MIN_POSITIONS}")
    options = as_options(quantize)
    # Before the fusing and the parity run, which take minutes on a big graph.
    if output.exists() and not force:
        raise LmexportError(f"{output}: already exists (use --force to replace it)")
    if source.is_dir():
        return _optimize_folder(
            source, output, target, check, tolerance, options, force, max_positions
        )
    if output.is_dir():
        raise LmexportError(f"{output}: is a folder (an ONNX file's output is a file)")
    if options is not None:
        raise LmexportError(
            "--quantize takes a folder written by `lmexport convert`, not an ONNX file"
        )
    positions = MAX_POSITIONS if max_positions is None else max_positions
    fused, report = _optimized(load_onnx(source), target, check, tolerance, positions)
    _save(fused, output)
    return report


def default_tolerance(model: onnx.ModelProto) -> float:
    """1e-4 for a float32 graph. A float16/bfloat16 one rounds each op's result to about three
    digits, and a fusion that sums in another order moves its outputs by more than 1e-4 (9e-4
    on llama-tiny in float16): 1e-2 there. Which one a graph is: most of its weights' elements
    (a float32 graph with one half-precision constant keeps the strict bar)."""
    elements: Counter[int] = Counter()
    for tensor in model.graph.initializer:
        elements[tensor.data_type] += math.prod(tensor.dims)
    halves = elements[onnx.TensorProto.FLOAT16] + elements[onnx.TensorProto.BFLOAT16]
    return 1e-2 if halves > elements[onnx.TensorProto.FLOAT] else 1e-4


def _optimized(
    model: onnx.ModelProto,
    target: str,
    check: bool,
    tolerance: float | None,
    max_positions: int,
) -> tuple[onnx.ModelProto, Report]:
    if is_image_model(model):
        fused, report = optimize_image_model(model)
    else:
        fused, report = optimize_model(model, target, max_positions)
    if check and report.applied:
        worst = check_same(model, fused, max_positions)
        tolerance = default_tolerance(model) if tolerance is None else tolerance
        if not worst <= tolerance:  # NaN included
            raise LmexportError(
                f"the optimized graph differs from the input by {worst:.3g} (> {tolerance:g}); "
                "nothing written"
            )
        report.max_diff = worst
    return fused, report


def _optimize_folder(
    source: Path,
    output: Path,
    target: str,
    check: bool,
    tolerance: float | None,
    quantize: QuantizeOptions | None,
    force: bool,
    max_positions: int | None,
) -> Report:
    """A copy of the folder with the fused (and maybe quantized) graph and `lmexport.json`
    saying what was done."""
    import shutil

    from ..exporter.folder import save_model, staged_folder, write_manifest
    from ..exporter.genai import GENAI_CONFIG, write_genai_config
    from ..runtime.manifest import MANIFEST, MODEL_FILE, every_layer_grouped, read_manifest

    manifest = read_manifest(source)
    if manifest["target"] not in ("plain", target):
        # Its graph keeps the other target's ops, which the new manifest would deny.
        raise LmexportError(
            f"{source}: is a `{manifest['target']}` export; optimize takes a `--target plain` "
            f"folder (or one already `{target}`)"
        )
    if quantize is not None:
        check_quantizable({**manifest, "target": target})
    if max_positions is None:  # as `convert` builds its rotary caches: the whole context
        max_positions = manifest.get("config", {}).get("max_position_embeddings", MAX_POSITIONS)
    assert max_positions is not None
    fused, report = _optimized(
        load_onnx(source / MODEL_FILE), target, check, tolerance, max_positions
    )
    with staged_folder(output, force, source=source) as stage:
        for item in source.iterdir():
            written_here = (MANIFEST, MODEL_FILE, MODEL_FILE + ".data", GENAI_CONFIG)
            if item.name not in written_here and item.is_file():
                shutil.copy2(item, stage / item.name)
        opset = next(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx"))
        passes = {**manifest.get("passes", {}), "optimize": report.applied_by_fusion()}
        manifest.pop("format_version", None)
        manifest = {**manifest, "target": target, "opset": opset, "passes": passes}
        if quantize is not None:
            fused = quantize_into(fused, quantize, manifest, stage)
        save_model(fused, stage)
        write_manifest(stage, manifest)
        # As `convert --target ort` writes it: a cached graph grouped in every layer.
        if manifest["arch"] == "llama" and manifest["kv_cache"] and every_layer_grouped(manifest):
            write_genai_config(stage, manifest["config"])
    return report


def _save(model: onnx.ModelProto, output: Path) -> None:
    """Through a temporary file beside `output`, so a failure leaves no partial file. An older
    `OUTPUT.data` (which onnx refuses to overwrite) is set aside until the new graph is in
    place, then removed, or put back if the write fails."""
    parent = output.absolute().parent
    if not parent.is_dir():
        raise LmexportError(f"{parent}: folder does not exist")
    data = parent / (output.name + ".data")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    umask_mode(Path(tmp), 0o666)
    old_data = None
    if data.exists():
        fd, old_data = tempfile.mkstemp(prefix=f".{data.name}.", suffix=".old", dir=parent)
        os.close(fd)
        os.replace(data, old_data)
    try:
        save_onnx(model, Path(tmp), data.name)
        os.replace(tmp, output)
    except BaseException:
        if old_data is not None:
            os.replace(old_data, data)
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if old_data is not None:
        os.remove(old_data)
