"""Weight-only quantization of a Llama graph: constant-weight MatMuls → `MatMulNBits`, the
token embedding's Gather → `GatherBlockQuantized`, one weight at a time (`blocks.py`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from ..errors import LmexportError
from .blocks import BlockQuantized, quantize_blocks

MS_DOMAIN = "com.microsoft"
# Ops between the LM head's MatMul and the `logits` output that keep it the LM head.
_PASS_THROUGH = ("Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize and how. `accuracy_level` 4 lets onnxruntime quantize the activations
    to int8 per block and multiply in integers, its fastest CPU path; 0 dequantizes to float."""

    bits: int = 4
    block_size: int = 32
    lm_head: bool = True
    embedding: bool = False
    accuracy_level: int = 4
    symmetric: bool = False


def _constant_2d(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or len(value.const_value.shape) != 2:
        return None
    array = value.const_value.numpy()
    return array if np.issubdtype(array.dtype, np.floating) else None


def _matmul_weight(value: ir.Value | None) -> tuple[np.ndarray, str] | None:
    """A MatMul's constant B as [N, K] (the layout MatMulNBits wants) and a name for it; B may
    be a transposed constant, as a tied LM head is exported."""
    if value is None:
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        perm = producer.attributes.get_ints("perm", [1, 0])
        table = _constant_2d(producer.inputs[0])
        if table is None or list(perm) != [1, 0]:
            return None
        return table, producer.inputs[0].name or "weight"  # type: ignore[union-attr]
    weight = _constant_2d(value)
    # A view, not a copy: quantize copies it anyway, and the streaming converter's stand-in
    # weights (exporter/stand_in_quantize.py) must reach it as views of themselves.
    return None if weight is None else (weight.T, value.name or "weight")


def lm_head_node(graph: ir.Graph) -> ir.Node | None:
    """The MatMul that produces `logits` (through casts and reshapes), if any."""
    outputs = [v for v in graph.outputs if v.name == "logits"] or list(graph.outputs[:1])
    node = outputs[0].producer() if outputs else None
    while node is not None and node.op_type in _PASS_THROUGH and node.domain == "":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node if node is not None and node.op_type == "MatMul" and node.domain == "" else None


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    ir.convenience.replace_nodes_and_values(
        graph, old, [old], [new], list(old.outputs), list(new.outputs)
    )


def _matmul_nbits(
    graph: ir.Graph, node: ir.Node, q: BlockQuantized, stem: str, accuracy_level: int
) -> ir.Node:
    inputs = [
        node.inputs[0],
        _initializer(graph, f"{stem}_q{q.bits}", q.codes),
        _initializer(graph, f"{stem}_scales", q.scales.reshape(-1)),
    ]
    if q.zero_points is not None:
        inputs.append(_initializer(graph, f"{stem}_zero_points", q.zero_points.reshape(-1)))
    attributes = {
        "K": q.cols,
        "N": q.rows,
        "bits": q.bits,
        "block_size": q.block_size,
        "accuracy_level": accuracy_level,
    }
    return ir.node(
        "MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=f"{node.name}_q{q.bits}"
    )


def _gather_block_quantized(
    graph: ir.Graph, node: ir.Node, q: BlockQuantized, stem: str
) -> ir.Node:
    inputs = [
        _initializer(graph, f"{stem}_q{q.bits}", q.codes.reshape(q.rows, -1)),
        node.inputs[1],
        _initializer(graph, f"{stem}_scales", q.scales),
    ]
    if q.zero_points is not None:
        inputs.append(_initializer(graph, f"{stem}_zero_points", q.zero_points))
    attributes = {
        "gather_axis": 0,
        "quantize_axis": 1,
        "bits": q.bits,
        "block_size": q.block_size,
    }
    return ir.node(
        "GatherBlockQuantized", inputs, attributes, domain=MS_DOMAIN, name=f"{node.name}_q{q.bits}"
    )


def quantize_graph(
    model: ir.Model,
    options: QuantizeOptions,
    quantize: Callable[[np.ndarray, int, int, bool], BlockQuantized] = quantize_blocks,
) -> Counter[str]:
    """Rewrite `model` in place; returns how many nodes became each quantized op.

    `quantize` is called as `quantize_blocks` is, on a view of each weight: the streaming
    converter (exporter/streaming.py) passes one that stands in for weights it writes later.
    """
    graph = model.graph
    head = lm_head_node(graph)
    done: Counter[str] = Counter()
    for node in list(graph):
        if node.domain != "":
            continue
        if node.op_type == "MatMul" and (node is not head or options.lm_head):
            found = _matmul_weight(node.inputs[1])
            if found is None:
                continue
            weight, stem = found
            q = quantize(weight, options.bits, options.block_size, options.symmetric)
            _replace(graph, node, _matmul_nbits(graph, node, q, stem, options.accuracy_level))
            done["MatMulNBits"] += 1
        elif node.op_type == "Gather" and options.embedding:
            table = _constant_2d(node.inputs[0])
            axis = node.attributes.get_int("axis", 0)
            if table is None or axis != 0:
                continue
            if table.shape[1] % options.block_size:
                raise LmexportError(
                    f"the embedding's width {table.shape[1]} is not a multiple of the block size "
                    f"{options.block_size}; quantize without --quantize-embedding"
                )
            q = quantize(table, options.bits, options.block_size, options.symmetric)
            stem = node.inputs[0].name or "embedding"  # type: ignore[union-attr]
            _replace(graph, node, _gather_block_quantized(graph, node, q, stem))
            done["GatherBlockQuantized"] += 1
    if not done:
        raise LmexportError("the graph has no MatMul or Gather with a constant weight to quantize")
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return done
