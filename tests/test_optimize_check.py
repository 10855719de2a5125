"""`optimize`'s own parity check must catch a fusion that is wrong only where masks of ones and
the first positions do not reach: a dropped padding mask, a rotary cache wrong past its first
rows. Each case breaks a correct fused graph by hand and expects check_same to see it; and a
correct one must pass whatever its outputs are called."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lmexport
from lmexport.optimizers import optimize_model
from lmexport.optimizers.check import check_same
from lmexport.optimizers.command import default_tolerance


@pytest.fixture(scope="module")
def plain_graph(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    folder = lmexport.convert("llama-tiny", tmp_path_factory.mktemp("plain") / "m", target="plain")
    return onnx.load(str(folder / "model.onnx"))


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_dropped_padding_mask_is_caught(plain_graph: onnx.ModelProto, target: str) -> None:
    fused, _ = optimize_model(plain_graph, target)
    assert check_same(plain_graph, fused) <= 1e-4
    # Attention without its mask input stays causal (GroupQueryAttention always is; Attention
    # keeps is_causal): only a padded key tells the broken graph from the right one.
    dropped = 0
    for node in fused.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[10] = ""  # attention_bias
            dropped += 1
        elif node.op_type == "Attention" and len(node.input) > 3 and node.input[3]:
            node.input[3] = ""  # attn_mask
            node.attribute.append(onnx.helper.make_attribute("is_causal", 1))
            dropped += 1
    assert dropped
    assert check_same(plain_graph, fused) > 1e-2


def test_rotary_rows_of_a_plain_export_are_checked(plain_graph: onnx.ModelProto) -> None:
    """A plain export computes its positions from the mask: only the cached run (a past of
    300) reaches the fused rotary cache past its first rows."""
    fused, _ = optimize_model(plain_graph, "ort")
    tables = [t for t in fused.graph.initializer if t.name.startswith("rotary_")]
    assert tables
    for t in tables:
        rows = numpy_helper.to_array(t).copy()
        rows[8:] = 0.0
        t.CopyFrom(numpy_helper.from_array(rows, t.name))
    assert check_same(plain_graph, fused) > 1e-2


def test_caches_under_other_names_pass(plain_graph: onnx.ModelProto) -> None:
    """GroupQueryAttention's keys of a padded row differ from the plain graph's (rotated from
    its first slot) without changing a logit: left out by their layout, not by their name."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(plain_graph)
    names = {o.name: o.name.replace("present.", "kv_out.") for o in renamed.graph.output}
    for node in renamed.graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]
    for output in renamed.graph.output:
        output.name = names[output.name]
    fused, _ = optimize_model(renamed, "ort")
    assert sum(n.op_type == "GroupQueryAttention" for n in fused.graph.node) > 0
    assert check_same(renamed, fused) <= 1e-4


def cumulative_graph(mask_type: int, uses_mask: bool) -> onnx.ModelProto:
    """logits[b, s] = the sum of the embeddings of the (unmasked) ids up to s."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", mask_type, ["batch", "sequence"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 8])
    table = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["e"])]
    if uses_mask:
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
            helper.make_node("Mul", ["e", "m3"], ["kept"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["e"], ["kept"]))
    nodes.append(helper.make_node("CumSum", ["kept", "axis"], ["logits"]))
    weights = [
        numpy_helper.from_array(table, "embed"),
        numpy_helper.from_array(np.array(1, np.int64), "axis"),
        numpy_helper.from_array(np.array([2], np.int64), "last"),
    ]
    graph = helper.make_graph(nodes, "g", [ids, mask], [out], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mask_type", [TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT])
def test_masks_of_any_type_are_padded(mask_type: int) -> None:
    model = cumulative_graph(mask_type, uses_mask=True)
    assert check_same(model, model) == 0.0
    assert check_same(model, cumulative_graph(mask_type, uses_mask=False)) > 1e-2


def test_nan_is_a_difference() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    same = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    nan = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "x"], ["zero"]),
            helper.make_node("Div", ["zero", "zero"], ["y"]),
        ],
        "g",
        [x],
        [y],
    )
    opset = [helper.make_opsetid("", 17)]
    before, after = (helper.make_model(g, opset_imports=opset) for g in (same, nan))
    assert check_same(before, after) == float("inf")


def test_tolerance_follows_most_weights(plain_graph: onnx.ModelProto) -> None:
    """A float32 graph keeps 1e-4 with a float16 constant in it; a float16 model gets 1e-2."""
    assert default_tolerance(plain_graph) == 1e-4
    mixed = onnx.ModelProto()
    mixed.CopyFrom(plain_graph)
    half = numpy_helper.from_array(np.zeros(8, np.float16), "a_half_constant")
    mixed.graph.initializer.append(half)
    assert default_tolerance(mixed) == 1e-4
    for tensor in mixed.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    assert default_tolerance(mixed) == 1e-2
