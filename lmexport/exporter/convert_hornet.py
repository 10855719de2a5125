"""`convert` for HorNet sources: model.onnx and the manifest of a classifier folder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LmexportError
from ..models.hornet import HorNet
from ..models.source import LoadedModel
from ..runtime.vision import preprocessing
from .compat import check_runnable
from .folder import save_model
from .hornet import OPSET, export_hornet
from .llama import graph_io


def convert_hornet(
    loaded: LoadedModel, stage: Path, target: str, dtype: str, image_size: int | None
) -> dict[str, Any]:
    """Write `stage`/model.onnx; return the manifest. `image_size` defaults to the size the
    model's global filters were built for (224 for 7x7 models, whose graph takes any size)."""
    model = loaded.model
    assert isinstance(model, HorNet)
    if dtype != "float32":
        raise LmexportError(f"HorNet models are exported in float32 only, not {dtype}")
    config = model.config
    size = config.native_size if image_size is None else image_size
    source_record = loaded.source_record()
    proto = export_hornet(model, target, size)
    check_runnable(proto, target)
    save_model(proto, stage)
    ops = Counter(n.op_type for n in proto.graph.node)
    filters = sum(depth for depth, gf in zip(config.depths, config.gf_sizes, strict=True) if gf)
    passes = (
        {"DFT": ops["DFT"]}
        if target == "plain"
        else {
            "LayerNormalization": ops["LayerNormalization"],
            "global_filters_as_matmuls": filters,
            **({"BiasGelu": ops["BiasGelu"]} if target == "ort" else {}),
        }
    )
    return {
        "arch": "hornet",
        "config": {**config.to_dict(), "image_size": size if config.global_filter else None},
        "target": target,
        "dtype": dtype,
        "opset": OPSET,
        "kv_cache": False,
        **graph_io(proto),
        "preprocess": preprocessing(size),
        "source": source_record,
        "passes": {"export": passes},
        "quantization": None,
    }
