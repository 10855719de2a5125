"""The `ort` BiasGelu fusion of HorNet exports: exact Gelus after a biased Gemm fuse, with the
same results in onnxruntime; the tanh Gelu and scaled Gemms stay as they are."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lmexport.optimizers import bias_gelu


def mlp() -> onnx.ModelProto:
    """x [batch, 8] through three Gemm + Gelu layers: exact, tanh, and exact after alpha 2."""
    rng = np.random.default_rng(0)
    shapes = {"w0": (16, 8), "b0": (16,), "w1": (16, 12), "b1": (12,), "w2": (6, 12), "b2": (6,)}
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in shapes.items()
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["g0"], transB=1),
        helper.make_node("Gelu", ["g0"], ["h0"]),
        helper.make_node("Gemm", ["h0", "w1", "b1"], ["g1"]),
        helper.make_node("Gelu", ["g1"], ["h1"], approximate="tanh"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["g2"], transB=1, alpha=2.0),
        helper.make_node("Gelu", ["g2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_exact_gelu_after_gemm_fuses() -> None:
    source = mlp()
    graph = ir.serde.deserialize_model(source)
    assert bias_gelu.rules.apply_to_model(graph) == 1
    fused = ir.serde.serialize_model(graph)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops == {"Gemm": 3, "BiasGelu": 1, "Gelu": 2}
    producers = {out: n for n in fused.graph.node for out in n.output}
    (fusion,) = (n for n in fused.graph.node if n.op_type == "BiasGelu")
    assert fusion.domain == "com.microsoft"
    assert list(producers[fusion.input[0]].input) == ["x", "w0"]  # the Gemm without its bias
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32) * 3
    assert np.abs(run(fused, x) - run(source, x)).max() <= 1e-6
