"""RMSNorm fusions of `optimize`: each graph runs in onnxruntime before and after fusing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lmexport
from lmexport.optimizers import optimize_model

D = 8
SHAPE = ["batch", "sequence", D]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, feeds)]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(
        float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max())
        for x, y in zip(a, b, strict=True)
    )


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def rms_norm_nodes(
    x: str,
    out: str,
    *,
    cast: bool,
    square: str = "pow",
    inverse: str = "reciprocal",
    axis: int = -1,
) -> list[onnx.NodeProto]:
    """x * rsqrt(mean(x², axis) + eps) * weight, spelled the ways exporters spell it."""
    h = "h" if cast else x
    nodes = [helper.make_node("Cast", [x], ["h"], to=TensorProto.FLOAT)] if cast else []
    if square == "pow":
        nodes.append(helper.make_node("Pow", [h, "two"], ["sq"]))
    else:
        nodes.append(helper.make_node("Mul", [h, h], ["sq"]))
    nodes += [
        helper.make_node("ReduceMean", ["sq", f"axis{axis}"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["ms"]),
        helper.make_node("Sqrt", ["ms"], ["rms"]),
    ]
    if inverse == "reciprocal":
        nodes += [
            helper.make_node("Reciprocal", ["rms"], ["inv"]),
            helper.make_node("Mul", [h, "inv"], ["n"]),
        ]
    elif inverse == "pow":
        nodes += [
            helper.make_node("Pow", ["ms", "minus_half"], ["inv"]),
            helper.make_node("Mul", ["inv", h], ["n"]),
        ]
    else:
        nodes.append(helper.make_node("Div", [h, "rms"], ["n"]))
    if cast:
        nodes.append(helper.make_node("Cast", ["n"], ["y"], to=TensorProto.FLOAT16))
    nodes.append(helper.make_node("Mul", ["weight", "y" if cast else "n"], [out]))
    return nodes


def make_model(
    nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str], dtype: int, opset: int = 18
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    constants = {
        "two": np.array(2.0, np.float32),
        "minus_half": np.array(-0.5, np.float32),
        "eps": np.array(1e-6, np.float32),
        "axis-1": np.array([-1], np.int64),
        "axis1": np.array([1], np.int64),
        "weight": rng.uniform(0.5, 1.5, D).astype(np_dtype),
    }
    graph = helper.make_graph(
        nodes,
        "norm",
        [helper.make_tensor_value_info(name, dtype, SHAPE) for name in inputs],
        [helper.make_tensor_value_info(name, dtype, SHAPE) for name in outputs],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def random_feeds(model: onnx.ModelProto, dtype: type) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal((2, 5, D)).astype(dtype) for i in model.graph.input}


@pytest.mark.parametrize(
    ("square", "inverse"), [("pow", "reciprocal"), ("mul", "pow"), ("pow", "div")]
)
def test_rms_norm_fp32_fuses(square: str, inverse: str) -> None:
    model = make_model(
        rms_norm_nodes("x", "out", cast=False, square=square, inverse=inverse),
        ["x"],
        ["out"],
        TensorProto.FLOAT,
    )
    fused, report = optimize_model(model, "onnx")
    assert ops(fused) == {"RMSNormalization": 1}
    assert report.fusions[0].applied == 1
    feeds = random_feeds(model, np.float32)
    assert max_diff(run(model, feeds), run(fused, feeds)) <= 1e-5


def test_rms_norm_fp16_with_casts_fuses() -> None:
    model = make_model(rms_norm_nodes("x", "out", cast=True), ["x"], ["out"], TensorProto.FLOAT16)
    fused, _ = optimize_model(model, "onnx")
    assert ops(fused) == {"RMSNormalization": 1}
    node = fused.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["stash_type"] == 1
    feeds = random_feeds(model, np.float16)
    assert max_diff(run(model, feeds), run(fused, feeds)) <= 1e-5


def test_opset_17_graph_is_converted_and_fuses() -> None:
    nodes = rms_norm_nodes("x", "out", cast=False)
    (reduce,) = [n for n in nodes if n.op_type == "ReduceMean"]
    del reduce.input[1]  # before opset 18 the axes are an attribute
    reduce.attribute.append(helper.make_attribute("axes", [-1]))
    model = make_model(nodes, ["x"], ["out"], TensorProto.FLOAT, opset=17)
    fused, _ = optimize_model(model, "onnx")
    assert ops(fused) == {"RMSNormalization": 1}
    assert fused.opset_import[0].version == 23
    feeds = random_feeds(model, np.float32)
    assert max_diff(run(model, feeds), run(fused, feeds)) <= 1e-5


def test_reduce_mean_over_other_axis_is_refused() -> None:
    model = make_model(
        rms_norm_nodes("x", "out", cast=False, axis=1), ["x"], ["out"], TensorProto.FLOAT
    )
    fused, report = optimize_model(model, "onnx")
    assert ops(fused)["RMSNormalization"] == 0
    assert ops(fused)["ReduceMean"] == 1
    fusion = next(f for f in report.fusions if f.name == "rms_norm")
    assert fusion.applied == 0
    assert any("not the last axis" in reason for reason in fusion.refused), fusion.refused


def test_skip_rms_norm_fuses_for_ort() -> None:
    # The sum is both normalised and the residual the block output is added back to.
    nodes = [
        helper.make_node("Add", ["a", "b"], ["x"]),
        *rms_norm_nodes("x", "normed", cast=False),
        helper.make_node("Add", ["x", "normed"], ["residual"]),
    ]
    model = make_model(nodes, ["a", "b"], ["normed", "residual"], TensorProto.FLOAT)
    fused, report = optimize_model(model, "ort")
    assert ops(fused) == {"SkipSimplifiedLayerNormalization": 1, "Add": 1}
    applied = {f.name: f.applied for f in report.fusions}
    assert (applied["rms_norm"], applied["skip_rms_norm"]) == (1, 1)
    onnx.checker.check_model(fused, full_check=True)
    feeds = random_feeds(model, np.float32)
    assert max_diff(run(model, feeds), run(fused, feeds)) <= 1e-5


@pytest.fixture(scope="module")
def plain_tiny(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    out = lmexport.convert("llama-tiny", tmp_path_factory.mktemp("plain") / "out", target="plain")
    return onnx.load(Path(out) / "model.onnx")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("onnx", {"RMSNormalization": 9, "SkipSimplifiedLayerNormalization": 0}),
        ("ort", {"RMSNormalization": 1, "SkipSimplifiedLayerNormalization": 8}),
    ],
)
def test_llama_tiny_norms_fuse(
    plain_tiny: onnx.ModelProto, target: str, expected: dict[str, int]
) -> None:
    fused, report = optimize_model(plain_tiny, target)
    counts = ops(fused)
    assert {op: counts[op] for op in expected} == expected
    assert counts["ReduceMean"] == 0
    assert report.nodes_after < report.nodes_before
    assert all(not f.refused for f in report.fusions), report.table()
    onnx.checker.check_model(fused, full_check=True)

    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 512, (1, 5), dtype=np.int64),
        "attention_mask": np.ones((1, 5), np.int64),
    }
    for value in plain_tiny.graph.input:
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, 2, 0, 16), np.float32)
    assert max_diff(run(plain_tiny, feeds), run(fused, feeds)) <= 1e-4
