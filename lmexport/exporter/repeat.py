"""Completing a traced template: each stage's first block repeated in the ONNX graph.

Tracing costs about 10 ms per op on two cores, and every HorNet has 25 blocks (2, 3, 18, 2), so
tracing them all takes most of a minute. The blocks of a stage are one computation on different
weights, so `export_hornet` traces a template with one block per stage and this pass copies that
block's nodes for the others, each copy reading the weights named for its block
(`stages.2.5.gnconv.proj_out.weight`) from the full model's state_dict.

A block's nodes are those but Constants that the exporter records as made inside module
`stages.{i}.0` (`pkg.torch.onnx.name_scopes`). They must take the stream from one value and hand
it on as one value; anything else is a bug, reported as such. `verify` checks the result against
PyTorch.
"""

from __future__ import annotations

import ast

import numpy as np
import onnx
from onnx import numpy_helper

SCOPES = "pkg.torch.onnx.name_scopes"


def _in_scope(node: onnx.NodeProto, scope: str) -> bool:
    for prop in node.metadata_props:
        if prop.key == SCOPES:
            return scope in ast.literal_eval(prop.value)
    return False


def repeat_blocks(
    model: onnx.ModelProto, depths: list[int], weights: dict[str, np.ndarray]
) -> None:
    """Give stage i of the template `model` depths[i] blocks, in place."""
    for stage, depth in enumerate(depths):
        _repeat(model.graph, f"stages.{stage}.", depth, weights)


def _repeat(graph: onnx.GraphProto, stage: str, depth: int, weights: dict[str, np.ndarray]) -> None:
    template = stage + "0"
    # Constants stay shared: the exporter reuses one Constant node wherever a value recurs.
    block = [n for n in graph.node if n.op_type != "Constant" and _in_scope(n, template)]
    if not block:
        raise AssertionError(f"the traced template has no nodes of {template}")
    produced = {o for n in block for o in n.output if o}
    members = {id(n) for n in block}
    outside = [n for n in graph.node if id(n) not in members]
    read_outside = {i for n in outside for i in n.input} | {o.name for o in graph.output}
    outputs = sorted(produced & read_outside)
    initializers = {t.name for t in graph.initializer}
    types = {v.name: v.type for v in (*graph.value_info, *graph.input)}
    external = {i for n in block for i in n.input if i and i not in produced}
    streams = [
        i
        for i in sorted(external - initializers)
        if len(outputs) == 1 and types.get(i) == types.get(outputs[0])
    ]
    if len(outputs) != 1 or len(streams) != 1:
        raise AssertionError(
            f"{template} is not one block in the traced graph: reads {streams}, hands on {outputs}"
        )
    (stream_in,), (stream_out,) = streams, outputs
    own_weights = sorted(i for i in external & initializers if i.startswith(template + "."))
    value_info = {v.name: v for v in graph.value_info if v.name in produced}

    position = max(i for i, n in enumerate(graph.node) if id(n) in members) + 1
    previous = stream_out
    copies: list[onnx.NodeProto] = []
    for k in range(1, depth):
        name = f"{stage}{k}"
        renamed = {v: f"{v}__{name}" for v in produced}
        renamed |= {w: name + w[len(template) :] for w in own_weights}
        renamed[stream_in] = previous
        for node in block:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}__{name}"
            copy.input[:] = [renamed.get(i, i) for i in node.input]
            copy.output[:] = [renamed.get(o, o) for o in node.output]
            for prop in copy.metadata_props:
                prop.value = prop.value.replace(f"'{template}", f"'{name}")
            copies.append(copy)
        for value, info in value_info.items():
            copy_info = graph.value_info.add()
            copy_info.CopyFrom(info)
            copy_info.name = renamed[value]
        graph.initializer.extend(
            numpy_helper.from_array(weights[renamed[w]], renamed[w]) for w in own_weights
        )
        previous = renamed[stream_out]
    for node in outside:
        node.input[:] = [previous if i == stream_out else i for i in node.input]
    for output in graph.output:
        if output.name == stream_out:
            output.name = previous
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes[:position], *copies, *nodes[position:]])
