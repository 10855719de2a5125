"""Parity of an exported HorNet folder against its PyTorch source, on seeded random images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LmexportError
from ..models.hornet import HorNet
from ..models.source import is_checkpoint_file, load_source
from ..runtime.vision import ImageClassifier
from .metrics import max_abs_diff, top1_agreement
from .report import Check, Report
from .source import check_same_shape, source_weights_check

FP32_LOGITS_TOL = 1e-4  # absolute, or relative to the largest logit where logits are large
# The config fields that set the graph's and the source's tensor shapes (the variant first: it
# names the difference best). `image_size` is not one: it is the exported input size.
SHAPE_FIELDS = ("variant", "num_classes", "in_chans", "dims", "depths", "orders", "gf_sizes")


def _source_model(manifest: dict[str, Any], source: str | None) -> tuple[HorNet, str]:
    """The PyTorch model a folder was exported from (or `source`), and its name. A preset builds
    its own architecture (with the recorded seed when it is the folder's preset, as for a Llama);
    a checkpoint file is read as the folder's architecture, which it must have to be compared."""
    record, config = manifest["source"], manifest["config"]
    name = str(source or record.get("name") or record.get("path"))
    seed = record.get("seed") if name == record.get("name") else None
    arch = f"hornet-{config['variant']}" if is_checkpoint_file(name) else None
    model = load_source(name, seed if isinstance(seed, int) else None, arch).model
    if not isinstance(model, HorNet):
        raise LmexportError(f"{name}: is not a HorNet model")
    check_same_shape(model.config.to_dict(), config, name, SHAPE_FIELDS)
    return model, name


def logits_check(name: str, ref: np.ndarray, got: np.ndarray, inputs: str) -> Check:
    """Max abs and relative difference of the logits, and whether top-1 classes agree."""
    diff = max_abs_diff(ref, got)
    relative = diff / max(float(np.abs(ref).max()), 1e-30)
    top1 = top1_agreement(ref, got)
    passed = min(diff, relative) <= FP32_LOGITS_TOL and top1 == 1.0
    return Check(name, passed, {"max_abs": diff, "relative": relative, "top1": top1}, inputs)


def verify_hornet(
    folder: str | Path, *, source: str | None = None, provider: str = "cpu", seed: int = 0
) -> Report:
    classifier = ImageClassifier.load(folder, provider=provider)
    manifest = classifier.manifest
    model, source_name = _source_model(manifest, source)
    tolerances = {"logits_max_abs_or_relative": FP32_LOGITS_TOL, "top1_agreement": 1.0}
    report = Report(str(folder), source_name, provider, seed, manifest["dtype"], tolerances)
    report.checks.append(source_weights_check(model, manifest))
    rng = np.random.default_rng(seed)
    size = classifier.image_size
    shapes = [(1, size, size), (3, size, size)]
    if classifier.fixed_size is None:  # the graph takes any size: check one that is not square
        shapes.append((2, size // 2 + 32, size // 4 + 32))
    for batch, height, width in shapes:
        pixels = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(pixels)).numpy()
        got = classifier.logits(pixels)
        inputs = f"batch {batch} x 3 x {height} x {width} standard normal pixel values"
        report.checks.append(logits_check(f"logits_b{batch}_{height}x{width}", ref, got, inputs))
    return report
