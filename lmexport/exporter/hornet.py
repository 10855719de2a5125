"""HorNet → ONNX: `pixel_values` float32 [batch, 3, H, W] → `logits` float32 [batch, classes].

Batch is always dynamic; so are H and W for 7x7 models. A global filter holds a weight per
frequency of one feature-map size, so GF models are exported for one `image_size` (their weights
resized first, as the eager model does when it sees another size).
"""

from __future__ import annotations

from dataclasses import replace

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import nn

from ..errors import LmexportError
from ..models.hornet import HorNet
from ..optimizers import bias_gelu
from ..runtime.vision import MAX_SIZE, MIN_SIZE
from .fast_hornet import FastHorNet
from .quiet import quiet_export
from .repeat import repeat_blocks

OPSET = 20  # LayerNormalization (17), Gelu (20), DFT with its axis as an input (20)
TARGETS = ("ort", "onnx", "plain")


def first_blocks(model: HorNet) -> HorNet:
    """`model` cut to the first block of each stage, sharing its weights: the traced template."""
    config = replace(model.config, depths=[1, 1, 1, 1])
    with torch.device("meta"):
        template = HorNet(config)
    names = template.state_dict().keys()
    template.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k in names}, assign=True
    )
    return template.eval()


def export_hornet(model: HorNet, target: str, image_size: int) -> onnx.ModelProto:
    """Trace `model` at `image_size` and return the ONNX graph.

    `plain` traces the eager model (global filters as DFT ops); `ort` and `onnx` trace
    `FastHorNet` (standard ops), and `ort` then gives each MLP's first bias to onnxruntime's
    BiasGelu (`optimizers/bias_gelu.py`). Each is traced with one block per stage and completed
    by `repeat_blocks`.
    """
    if target not in TARGETS:
        raise LmexportError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if not MIN_SIZE <= image_size <= MAX_SIZE:
        raise LmexportError(f"--image-size {image_size}: must be in [{MIN_SIZE}, {MAX_SIZE}]")
    fixed = model.config.global_filter
    traced: nn.Module = first_blocks(model)
    full: nn.Module = model
    if target != "plain":
        size = image_size if fixed else None
        traced, full = FastHorNet(traced, size), FastHorNet(model, size)  # type: ignore[arg-type]
    dynamic: dict[int, object] = {0: torch.export.Dim("batch")}
    traced_size = image_size
    if not fixed:
        # torch.export asks for 2x2 maps at the last stage; the graph runs on smaller ones too,
        # so a smaller --image-size is traced at the least size it accepts (the graph is the same).
        least = 2 * 32
        dynamic[2] = torch.export.Dim("height", min=least)
        dynamic[3] = torch.export.Dim("width", min=least)
        traced_size = max(image_size, least)
    # Traced at batch 2 so that the batch dimension is not specialised.
    pixels = torch.zeros(2, model.config.in_chans, traced_size, traced_size)
    with quiet_export():
        program = torch.onnx.export(
            traced.eval(),
            (pixels,),
            dynamo=True,
            dynamic_shapes={"pixel_values": dynamic},
            input_names=["pixel_values"],
            output_names=["logits"],
            opset_version=OPSET,
            optimize=False,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    weights = {k: v.detach().numpy() for k, v in full.state_dict().items()}
    repeat_blocks(proto, model.config.depths, weights)
    graph = ir.serde.deserialize_model(proto)
    onnxscript.optimizer.optimize(graph)
    if target == "ort":
        bias_gelu.rules.apply_to_model(graph)
    proto = ir.serde.serialize_model(graph)
    _name_dims(proto)
    return proto


def _name_dims(proto: onnx.ModelProto) -> None:
    """DESIGN.md's names for the symbolic dimensions of the graph's inputs and outputs."""
    names = ["batch", None, "height", "width"]
    for value in (*proto.graph.input, *proto.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim, names, strict=False):
            if name is not None and dim.dim_param:
                dim.dim_param = name
