"""`optimize` for image classifiers (HorNet): DFT-based global filters → MatMuls.

`optimize` picks this pipeline by itself for graphs whose inputs are all float images
[batch, channels, height, width], so a HorNet graph needs no option. Its result uses standard ops
only and keeps the graph's opset, so `--target ort` and `--target onnx` give the same graph.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript.optimizer

from .global_filter import lower_global_filters
from .report import Report

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def is_image_model(model: onnx.ModelProto) -> bool:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.type.tensor_type for i in model.graph.input if i.name not in initializers]
    return bool(inputs) and all(
        t.elem_type in FLOATS and t.HasField("shape") and len(t.shape.dim) == 4 for t in inputs
    )


def optimize_image_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Report]:
    """The optimized graph and the report; `model` is left as it is."""
    graph = ir.serde.deserialize_model(model)
    nodes_before = len(graph.graph)
    onnxscript.optimizer.optimize(graph)
    fusion = lower_global_filters(graph)
    onnxscript.optimizer.optimize(graph)  # drops the DFT nodes the filters no longer read
    return ir.serde.serialize_model(graph), Report([fusion], nodes_before, len(graph.graph))
