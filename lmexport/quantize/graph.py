"""Weight-only quantization of a Llama graph: constant-weight MatMuls → `MatMulNBits`, the
token embedding's Gather → `GatherBlockQuantized`, one weight at a time (`blocks.py`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    offsets: bool = False  # MatMuls only: float per-block mins (blocks.py), not zero points
    lm_head_bits: int | None = None  # None: `bits`


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


def _replace(graph: ir.Graph, old: ir.Node, new: list[ir.Node]) -> None:
    ir.convenience.replace_nodes_and_values(
        graph, old, [old], new, list(old.outputs), list(new[-1].outputs)
    )


def _named(op: str, inputs: list[ir.Value], name: str, **attributes: Any) -> ir.Node:
    """A node and its one output named after `name`: names that depend on nothing but the
    weights' own, so a streamed export's graph is the in-memory one byte for byte."""
    return ir.node(op, inputs, attributes, name=name, outputs=[ir.Value(name=name)])


class _BlockSums:
    """Per MatMul input and block size, the input summed over each block of its last axis
    ([..., K] → [..., K / block]), built once and shared by the MatMuls that read it (q, k, v;
    gate, up). Those nodes go in before the first such MatMul, ahead of every other."""

    def __init__(self, graph: ir.Graph) -> None:
        self._graph = graph
        self._made: dict[tuple[int, int], ir.Value] = {}

    def __call__(self, x: ir.Value, cols: int, block_size: int) -> tuple[ir.Value, list[ir.Node]]:
        key = (id(x), block_size)
        if key in self._made:
            return self._made[key], []
        stem = f"{x.name}_block{block_size}"
        blocks = [cols // block_size, block_size]
        axis = _initializer(self._graph, f"{stem}_axis", np.array([-1]))
        nodes: list[ir.Node] = []
        if x.shape is not None:  # a constant shape, 0 keeping each leading dimension
            dims = np.array([0] * (len(x.shape) - 1) + blocks)
            shape = _initializer(self._graph, f"{stem}_shape", dims)
        else:
            tail = _initializer(self._graph, f"{stem}_tail", np.array(blocks))
            nodes.append(_named("Shape", [x], f"{stem}_lead", end=-1))
            nodes.append(_named("Concat", [nodes[-1].outputs[0], tail], f"{stem}_dims", axis=0))
            shape = nodes[-1].outputs[0]
        nodes.append(_named("Reshape", [x, shape], f"{stem}_blocks"))
        nodes.append(_named("ReduceSum", [nodes[-1].outputs[0], axis], f"{stem}_sums", keepdims=0))
        self._made[key] = nodes[-1].outputs[0]
        return self._made[key], nodes


def _with_offsets(
    nbits: ir.Node, q: BlockQuantized, offsets: ir.Value, use: str, sums: _BlockSums
) -> list[ir.Node]:
    """MatMulNBits(x) + block_sums(x) @ offsetsᵀ: each block's float offset times the sum of
    the inputs it multiplies. The Transpose is of a constant, folded when the session loads.
    `use` names this MatMul's own nodes (the weight's initializers may be shared)."""
    x = nbits.inputs[0]
    assert x is not None
    summed, nodes = sums(x, q.cols, q.block_size)
    nbits.outputs[0].name = f"{use}_q{q.bits}_out"
    nodes.append(nbits)
    nodes.append(_named("Transpose", [offsets], f"{use}_offsets_t", perm=[1, 0]))
    nodes.append(_named("MatMul", [summed, nodes[-1].outputs[0]], f"{use}_offset_terms"))
    nodes.append(_named("Add", [nbits.outputs[0], nodes[-1].outputs[0]], f"{use}_with_offsets"))
    return nodes


@dataclass(frozen=True)
class _Weight:
    """A MatMul weight quantized once for every MatMul that reads it: its initializers."""

    q: BlockQuantized
    stem: str
    inputs: list[ir.Value]  # MatMulNBits' codes, scales and zero points when there are any
    offsets: ir.Value | None  # --float-offsets


def _nbits_weight(graph: ir.Graph, q: BlockQuantized, stem: str) -> _Weight:
    inputs = [
        _initializer(graph, f"{stem}_q{q.bits}", q.codes),
        _initializer(graph, f"{stem}_scales", q.scales.reshape(-1)),
    ]
    if q.zero_points is not None:
        inputs.append(_initializer(graph, f"{stem}_zero_points", q.zero_points.reshape(-1)))
    offsets = None if q.offsets is None else _initializer(graph, f"{stem}_offsets", q.offsets)
    return _Weight(q, stem, inputs, offsets)


def _matmul_nbits(
    node: ir.Node, q: BlockQuantized, weights: list[ir.Value], name: str, accuracy_level: int
) -> ir.Node:
    attributes = {
        "K": q.cols,
        "N": q.rows,
        "bits": q.bits,
        "block_size": q.block_size,
        "accuracy_level": accuracy_level,
    }
    return ir.node(
        "MatMulNBits", [node.inputs[0], *weights], attributes, domain=MS_DOMAIN, name=name
    )


def _gather_weights(graph: ir.Graph, q: BlockQuantized, stem: str) -> list[ir.Value]:
    """GatherBlockQuantized's constant inputs, data first: codes, scales, zero points."""
    inputs = [
        _initializer(graph, f"{stem}_q{q.bits}", q.codes.reshape(q.rows, -1)),
        _initializer(graph, f"{stem}_scales", q.scales),
    ]
    if q.zero_points is not None:
        inputs.append(_initializer(graph, f"{stem}_zero_points", q.zero_points))
    return inputs


def _gather_block_quantized(
    node: ir.Node, q: BlockQuantized, weights: list[ir.Value], name: str
) -> ir.Node:
    attributes = {
        "gather_axis": 0,
        "quantize_axis": 1,
        "bits": q.bits,
        "block_size": q.block_size,
    }
    inputs = [weights[0], node.inputs[1], *weights[1:]]
    return ir.node("GatherBlockQuantized", inputs, attributes, domain=MS_DOMAIN, name=name)


def quantize_graph(
    model: ir.Model,
    options: QuantizeOptions,
    quantize: Callable[[np.ndarray, int, int, bool, bool], BlockQuantized] = quantize_blocks,
) -> Counter[str]:
    """Rewrite `model` in place; returns how many nodes became each quantized op.

    `quantize` is called as `quantize_blocks` is, on a view of each weight: the streaming
    converter (exporter/streaming.py) passes one that stands in for weights it writes later.
    """
    graph = model.graph
    head = lm_head_node(graph)
    sums = _BlockSums(graph)
    done: Counter[str] = Counter()
    # A weight read by several MatMuls (a projection applied twice, initializers that the
    # optimizer deduplicated) is quantized once; the same weight at other bits (a shared LM
    # head at --lm-head-bits) is another. Keys: (initializer name, bits).
    made: dict[tuple[str, int], _Weight] = {}
    uses: Counter[tuple[str, int]] = Counter()
    tables: dict[str, tuple[BlockQuantized, list[ir.Value]]] = {}  # embeddings, by name
    for node in list(graph):
        if node.domain != "":
            continue
        if node.op_type == "MatMul" and (node is not head or options.lm_head):
            found = _matmul_weight(node.inputs[1])
            if found is None:
                continue
            array, name = found
            bits = options.lm_head_bits if node is head and options.lm_head_bits else options.bits
            key = (name, bits)
            if key not in made:
                stem = name if all(n != name for n, _ in made) else f"{name}_{bits}bits"
                q = quantize(array, bits, options.block_size, options.symmetric, options.offsets)
                made[key] = _nbits_weight(graph, q, stem)
            weight = made[key]
            # This MatMul's own nodes: the first reader's are named after the weight.
            use = f"{weight.stem}_{uses[key]}" if uses[key] else weight.stem
            uses[key] += 1
            nbits = _matmul_nbits(
                node, weight.q, weight.inputs, f"{node.name or use}_q{bits}", options.accuracy_level
            )
            new = (
                [nbits]
                if weight.offsets is None
                else _with_offsets(nbits, weight.q, weight.offsets, use, sums)
            )
            _replace(graph, node, new)
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
            name = node.inputs[0].name or "embedding"  # type: ignore[union-attr]
            stem = f"{name}_gather"  # apart from the same table's MatMulNBits (a tied LM head)
            if name not in tables:
                q = quantize(table, options.bits, options.block_size, options.symmetric, False)
                tables[name] = q, _gather_weights(graph, q, stem)
            q, weights = tables[name]
            gather = _gather_block_quantized(node, q, weights, f"{node.name or stem}_q{q.bits}")
            _replace(graph, node, [gather])
            done["GatherBlockQuantized"] += 1
    if not done:
        raise LmexportError("the graph has no MatMul or Gather with a constant weight to quantize")
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return done
