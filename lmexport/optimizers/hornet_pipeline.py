"""`optimize` for image classifiers (HorNet): DFT-based global filters → MatMuls.

`optimize` picks this pipeline by itself for graphs with convolutions whose one input is a float
image [batch, 1 or 3 channels, height, width], so a HorNet graph needs no option. Its result uses
standard ops only and keeps the graph's opset, so `--target ort` and `--target onnx` give the same
graph.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript.optimizer

from .global_filter import lower_global_filters
from .report import Report

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def is_image_model(model: onnx.ModelProto) -> bool:
    """One float image input (grey or colour channels) and a Conv: rank-4 float inputs alone
    would take attention graphs (q, k, v, bias: [batch, heads, seq, head_dim]) for images and
    keep the Llama fusions from them."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.type.tensor_type for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return False
    (image,) = inputs
    dims = image.shape.dim if image.HasField("shape") else []
    return (
        image.elem_type in FLOATS
        and len(dims) == 4
        and dims[1].HasField("dim_value")
        and dims[1].dim_value in (1, 3)
        and any(n.op_type == "Conv" for n in _nodes(model))
    )


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's nodes and its local functions' (an exporter may keep modules as functions)."""
    return [*model.graph.node, *(n for f in model.functions for n in f.node)]


def optimize_image_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Report]:
    """The optimized graph and the report; `model` is left as it is."""
    graph = ir.serde.deserialize_model(model)
    nodes_before = len(graph.graph)
    onnxscript.optimizer.optimize(graph)
    fusion = lower_global_filters(graph)
    onnxscript.optimizer.optimize(graph)  # drops the DFT nodes the filters no longer read
    return ir.serde.serialize_model(graph), Report([fusion], nodes_before, len(graph.graph))
