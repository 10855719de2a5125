"""Weight-only int4/int8 quantization: the quantizer against onnxruntime's kernels, quantized
folders that load, run and pass `verify`, one that is broken and fails it, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lmexport
from lmexport.errors import LmexportError
from lmexport.quantize import (
    QuantizeOptions,
    blocks,
    dequantize_blocks,
    quantization_record,
    quantize_blocks,
)
from lmexport.quantize.graph import quantize_graph
from lmexport.runtime import LlamaRunner

from helpers import assert_bad_input, run


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "out"
    code, _, err = run("convert", "llama-tiny", "-o", str(out), "--quantize", "int4")
    assert code == 0, err
    return out


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("bits", "block_size", "shape"), [(4, 32, (37, 100)), (8, 16, (8, 64))])
def test_error_within_half_a_step(
    bits: int, block_size: int, shape: tuple[int, int], symmetric: bool
) -> None:
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    w[0, :block_size] += 1.0  # a block that is all positive
    q = quantize_blocks(w, bits, block_size, symmetric)
    assert q.codes.shape == (shape[0], -(-shape[1] // block_size), block_size * bits // 8)
    if symmetric:
        assert q.zero_points is None
    else:
        assert q.zero_points is not None
        assert q.zero_points.shape == (shape[0], -(-q.n_blocks * bits // 8))
    step = np.abs(np.repeat(q.scales, block_size, axis=1)[:, : shape[1]])
    err = np.abs(dequantize_blocks(q) - w)
    # Symmetric: the side of zero away from the block's extreme has one level fewer.
    clipped = w / np.repeat(q.scales, block_size, axis=1)[:, : shape[1]] > (1 << bits - 1) - 0.5
    within = step * np.where(symmetric & clipped, 1.0, 0.5)
    assert (err <= within * (1 + 1e-5) + 1e-12).all()
    assert err.max() > 0.1 * step.max()  # it did quantize


def test_float_offsets_land_on_a_q4_1_grid() -> None:
    """Weights as GGUF's Q4_1 dequantizes them (d·q + m, d and m float16 per block of 32) come
    back to float precision; with an integer zero point they move by up to half a step."""
    rng = np.random.default_rng(3)
    rows, n_blocks = 16, 6
    d = rng.uniform(0.001, 0.01, (rows, n_blocks, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, -0.02, (rows, n_blocks, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (rows, n_blocks, 32))
    q[..., 0], q[..., 1] = 0, 15  # as Q4_1 quantizes: each block's min and max are codes
    w = (d * q + m).reshape(rows, -1).astype(np.float32)
    exact = quantize_blocks(w, 4, 32, offsets=True)
    assert exact.zero_points is None and exact.offsets is not None
    assert exact.offsets.shape == exact.scales.shape == (rows, n_blocks)
    assert np.abs(dequantize_blocks(exact) - w).max() <= 1e-6 * np.abs(w).max()
    shifted = np.abs(dequantize_blocks(quantize_blocks(w, 4, 32)) - w).max()
    assert shifted > 0.1 * d.max()


def test_float_offsets_on_fresh_weights_and_partial_blocks() -> None:
    w = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32) + 3.0
    q = quantize_blocks(w, 8, 16, offsets=True)
    step = np.repeat(q.scales, 16, axis=1)
    assert (np.abs(dequantize_blocks(q) - w) <= step * 0.5 * (1 + 1e-5)).all()
    with pytest.raises(LmexportError, match="not a multiple of 32"):
        quantize_blocks(w[:, :40], 4, 32, offsets=True)


@pytest.mark.parametrize("input_shape", [["b", "s", 96], None], ids=["known_rank", "unknown"])
def test_float_offsets_graph_matches_dequantized_weights(input_shape: list[Any] | None) -> None:
    """MatMulNBits plus block sums times the offsets computes x @ dequantize(W) for a 3-D
    input, whether or not the graph knows its rank; two MatMuls of one input share its block
    sums."""
    rng = np.random.default_rng(5)
    k, n = 96, 40
    weights = [rng.standard_normal((k, n)).astype(np.float32) + 0.5 for _ in range(2)]
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(2)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    )
    options = QuantizeOptions(accuracy_level=0, offsets=True)
    assert quantize_graph(model, options) == {"MatMulNBits": 2}
    ops = [node.op_type for node in model.graph]
    assert ops.count("ReduceSum") == 1 and ops.count("Shape") == (input_shape is None)
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for w, y in zip(weights, session.run(None, {"x": x}), strict=True):
        expected = x @ dequantize_blocks(quantize_blocks(np.ascontiguousarray(w.T), offsets=True)).T
        assert np.abs(y - expected).max() <= 1e-4


def _dequantized(w: np.ndarray, bits: int, block_size: int, offsets: bool = False) -> np.ndarray:
    """A [rows, cols] table as the quantizer gives it back."""
    return dequantize_blocks(
        quantize_blocks(np.ascontiguousarray(w), bits, block_size, False, offsets)
    )


@pytest.mark.parametrize("lm_head_bits", [None, 8])
def test_tied_head_and_quantized_embedding(lm_head_bits: int | None) -> None:
    """A tied LM head (MatMul by the embedding's Transpose) and the embedding's Gather both
    quantize, each to its own initializers, and compute with the dequantized table."""
    rng = np.random.default_rng(6)
    vocab, width = 64, 32
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    w = rng.standard_normal((width, width)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["h2"]),
        helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "embed_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(w, "w")],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    )
    options = QuantizeOptions(
        block_size=16, embedding=True, accuracy_level=0, lm_head_bits=lm_head_bits
    )
    assert quantize_graph(model, options) == {"GatherBlockQuantized": 1, "MatMulNBits": 2}
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 3, 63]], dtype=np.int64)
    (got,) = session.run(None, {"input_ids": ids})
    h = _dequantized(table, 4, 16)[ids] @ _dequantized(w.T, 4, 16).T
    expected = h @ _dequantized(table, lm_head_bits or 4, 16).T
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("offsets", [False, True], ids=["zero_points", "float_offsets"])
def test_weight_shared_by_two_matmuls(offsets: bool) -> None:
    """One initializer read by two MatMuls is quantized once, and both read it."""
    w = np.random.default_rng(7).standard_normal((32, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
        [numpy_helper.from_array(w, "w")],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    )
    options = QuantizeOptions(block_size=16, accuracy_level=0, offsets=offsets)
    assert quantize_graph(model, options) == {"MatMulNBits": 2}
    assert sum(name.endswith("_q4") for name in model.graph.initializers) == 1
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(8).standard_normal((3, 32)).astype(np.float32)
    w_q = _dequantized(w.T, 4, 16, offsets).T
    expected = x @ w_q @ w_q
    assert np.abs(session.run(None, {"x": x})[0] - expected).max() <= 1e-4 * np.abs(expected).max()


def test_float_offsets_folder_verifies(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--quantize", "int4", "--block-size", "16", "--float-offsets"]
    code, _, err = run("convert", "llama-tiny", "-o", str(out), *args)
    assert code == 0, err
    record = json.loads((out / "lmexport.json").read_text())["quantization"]
    assert record["offsets"] is True and record["ops"] == {"MatMulNBits": 21}
    report = lmexport.verify(out, steps=8)
    assert report.passed, report.table()
    assert report.metrics["logits"]["max_abs"] < 1e-4


def _run(node: onnx.NodeProto, inits: list[onnx.TensorProto], x: np.ndarray, out: int) -> Any:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    assert y.shape[-1] == out
    return y


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (8, False), (4, True)])
def test_layout_matches_matmul_nbits(bits: int, symmetric: bool) -> None:
    """onnxruntime's kernel, fed our packing, computes x @ dequantize(W): packing order, scale
    and zero-point layout all agree (accuracy level 0: float arithmetic)."""
    rng = np.random.default_rng(1)
    k, n = 80, 24  # K not a multiple of the block: a padded last block
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    q = quantize_blocks(np.ascontiguousarray(w.T), bits, 32, symmetric)
    inits = [
        numpy_helper.from_array(q.codes, "b"),
        numpy_helper.from_array(q.scales.reshape(-1), "s"),
    ]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points.reshape(-1), "z"))
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s", "z"][: len(inits) + 1], ["y"], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=32, accuracy_level=0,
    )  # fmt: skip
    expected = x @ dequantize_blocks(q).T
    assert np.abs(_run(node, inits, x, n) - expected).max() <= 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_matches_gather_block_quantized(bits: int) -> None:
    table = np.random.default_rng(2).standard_normal((50, 64)).astype(np.float32)
    q = quantize_blocks(table, bits, 16)
    ids = np.array([[3, 0, 49, 3]], dtype=np.int64)
    node = helper.make_node(
        "GatherBlockQuantized", ["d", "x", "s", "z"], ["y"], domain="com.microsoft",
        gather_axis=0, quantize_axis=1, block_size=16, bits=bits,
    )  # fmt: skip
    assert q.zero_points is not None
    inits = [
        numpy_helper.from_array(q.codes.reshape(50, -1), "d"),
        numpy_helper.from_array(q.scales, "s"),
        numpy_helper.from_array(q.zero_points, "z"),
    ]
    assert np.abs(_run(node, inits, ids, 64) - dequantize_blocks(q)[ids]).max() <= 1e-6


def test_int4_folder_runs_and_verifies(int4_folder: Path) -> None:
    record = json.loads((int4_folder / "lmexport.json").read_text())["quantization"]
    assert record["method"] == "int4" and record["block_size"] == 32 and record["lm_head"]
    assert record["ops"] == {"MatMulNBits": 21}  # 5 projections x 4 layers + the LM head
    assert record["accuracy"]["prompts"] >= 8 and 0 < record["accuracy"]["top1_agreement"] <= 1
    model = onnx.load(str(int4_folder / "model.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "MatMul"]
    tokens = LlamaRunner.load(int4_folder).generate([[1, 2, 3]], 5, eos_token_id=[])
    assert tokens.shape == (1, 5)
    report = lmexport.verify(int4_folder, steps=8)
    assert report.passed, report.table()
    assert report.tolerances["kl_max"] == 1e-4 and report.tolerances["compute_kl_max"] == 0.05
    assert report.metrics["logits"]["max_abs"] < 1e-4  # accuracy level 0: the weights exactly
    assert report.metrics["quantized_compute"]["accuracy_level"] == 4


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


@pytest.mark.parametrize(
    "option",
    [["--symmetric"], ["--lm-head-bits", "8"], ["--accuracy-level", "0"]],
    ids=["symmetric", "lm_head_bits_8", "accuracy_level_0"],
)
def test_int4_folder_option_verifies(tiny_folder: Path, tmp_path: Path, option: list[str]) -> None:
    """Each option reaches the graph (not only lmexport.json), and `verify` quantizes its
    PyTorch reference the same way: a reference that ignored it would be off by the difference
    between the two quantizations, far above the quantized check's KL 1e-4."""
    out = tmp_path / "int4"
    code, _, err = run("optimize", str(tiny_folder), "-o", str(out), "--quantize", "int4", *option)
    assert code == 0, err
    manifest = json.loads((out / "lmexport.json").read_text())
    record = manifest["quantization"]
    nbits = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == record["ops"]["MatMulNBits"] == 21
    vocab = manifest["config"]["vocab_size"]
    (head,) = [n for n in nbits if _attribute(n, "N") == vocab]
    symmetric = option == ["--symmetric"]
    assert record["symmetric"] is symmetric
    for node in nbits:  # codes, scales and, unless symmetric, zero points
        assert len([name for name in node.input if name]) == (3 if symmetric else 4), node.name
    head_bits = 8 if option == ["--lm-head-bits", "8"] else 4
    assert record["lm_head_bits"] == _attribute(head, "bits") == head_bits
    assert {_attribute(n, "bits") for n in nbits if n is not head} == {4}
    level = 0 if option == ["--accuracy-level", "0"] else 4
    assert record["accuracy_level"] == level
    assert {_attribute(n, "accuracy_level") for n in nbits} == {level}

    report = lmexport.verify(out, steps=8)
    assert report.passed, report.table()
    assert report.metrics["logits"]["max_abs"] < 1e-4  # float activations: the weights exactly
    assert float(report.metrics["kv_cache"]["kl"]) <= 1e-6
    compute = report.metrics["quantized_compute"]
    assert compute["accuracy_level"] == level
    if level == 0:  # shipped as the exact graph is: nothing left to differ
        assert compute["top1"] == 1.0 and float(compute["kl"]) <= 1e-9


def test_optimize_int8_with_embedding(tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    args = ["optimize", str(tiny_folder), "-o", str(out), "--quantize", "int8"]
    code, stdout, err = run(*args, "--quantize-embedding", "--no-quantize-lm-head")
    assert code == 0, err
    assert "int8 (block 32): top-1 agreement" in stdout
    record = json.loads((out / "lmexport.json").read_text())["quantization"]
    assert record["ops"] == {"GatherBlockQuantized": 1, "MatMulNBits": 20}
    assert record["embedding"] and not record["lm_head"]
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"MatMul", "GatherBlockQuantized"} <= ops and "Gather" not in ops
    assert LlamaRunner.load(out).generate([[1, 2, 3]], 3, eos_token_id=[]).shape == (1, 3)
    assert lmexport.verify(out, steps=8).passed


def test_wrong_scales_fail_verify(tiny_folder: Path, tmp_path: Path) -> None:
    """Every scale 25% too large: the model still runs, and verify must say it is broken."""

    def off_scale(
        weight: np.ndarray, bits: int, block_size: int, symmetric: bool, offsets: bool
    ) -> blocks.BlockQuantized:
        q = quantize_blocks(weight, bits, block_size, symmetric, offsets)
        return dataclasses.replace(q, scales=q.scales * 1.25)

    out = tmp_path / "broken"
    shutil.copytree(tiny_folder, out)
    model = ir.load(out / "model.onnx")
    options = QuantizeOptions()
    ops = quantize_graph(model, options, off_scale)
    ir.save(model, out / "model.onnx")
    manifest = json.loads((out / "lmexport.json").read_text())
    manifest["quantization"] = quantization_record(options, ops, None)
    (out / "lmexport.json").write_text(json.dumps(manifest))
    report = lmexport.verify(out, steps=8)
    assert not report.passed
    assert float(report.metrics["logits"]["kl"]) > 1e-3


def test_bench_json_has_every_field(int4_folder: Path, tiny_folder: Path) -> None:
    args = ["bench", str(tiny_folder), "--prompt-length", "4", "--new-tokens", "3"]
    extra = ["--repeats", "1", "--threads", "1", "--vs-torch", "--draft", str(int4_folder)]
    code, stdout, err = run(*args, *extra, "--json", "-")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["threads"] == 1 and report["prompt_length"] == 4 and report["new_tokens"] == 3
    assert [e["name"] for e in report["engines"]] == ["ort", "speculative", "torch"]
    for engine in report["engines"]:
        for key in ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb"):
            assert engine[key] > 0, (engine["name"], key)
        assert engine["tokens_match_first"] is True  # greedy: speculative and PyTorch agree
    assert 0 <= report["engines"][1]["acceptance_rate"] <= 1
    assert set(report["ratios"]) == {"speculative", "torch"}
    assert set(report["ratios"]["torch"]) == {"decode_speedup", "prefill_speedup"}


def test_bench_table(tiny_folder: Path) -> None:
    args = ["bench", str(tiny_folder), "--prompt-length", "4", "--new-tokens", "2"]
    code, stdout, err = run(*args, "--repeats", "1")
    assert code == 0, err
    assert "decode tok/s" in stdout and "peak RSS MB" in stdout


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--quantize", "foo"], ["--quantize", "foo"]),
        (["--quantize", "int4", "--block-size", "24"], ["power of 2", "24"]),
        (["--quantize", "int4", "--block-size", "8"], ["at least 16"]),
        (["--quantize", "int4", "--accuracy-level", "7"], ["accuracy level"]),
        (["--block-size", "64"], ["--block-size", "only with --quantize"]),
        (["--quantize", "int8", "--target", "onnx"], ["ort target"]),
        (["--quantize", "int4", "--dtype", "float16"], ["float32"]),
        (["--quantize", "int4", "--float-offsets", "--symmetric"], ["pick one"]),
        (["--quantize", "int4", "--float-offsets"], ["176 columns", "multiple of 32"]),
    ],
)
def test_bad_quantize_options(tmp_path: Path, extra: list[str], words: list[str]) -> None:
    assert_bad_input(["convert", "llama-tiny", "-o", str(tmp_path / "out"), *extra], *words)
    assert not list(tmp_path.iterdir())


def test_bad_optimize_and_bench_input(tiny_folder: Path, int4_folder: Path, tmp_path: Path) -> None:
    model = str(tiny_folder / "model.onnx")
    assert_bad_input(
        ["optimize", model, "-o", str(tmp_path / "x.onnx"), "--quantize", "int4"], "folder"
    )
    args = ["optimize", str(int4_folder), "-o", str(tmp_path / "again"), "--quantize", "int4"]
    assert_bad_input(args, "quantized already")
    assert_bad_input(["bench", str(tiny_folder), "--new-tokens", "1"], "--new-tokens")
    assert_bad_input(["bench", str(tiny_folder), "--prompt-length", "600"], "context of 512")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "word"),
    [
        (QuantizeOptions(accuracy_level=7), "accuracy level"),
        (QuantizeOptions(symmetric=True, offsets=True), "--symmetric"),
        (QuantizeOptions(lm_head=False, lm_head_bits=8), "--lm-head-bits"),
        (QuantizeOptions(bits=3), "int3"),
    ],
    ids=["accuracy", "two-schemes", "head-bits", "bits"],
)
def test_options_built_by_hand_are_checked(
    options: QuantizeOptions, word: str, tmp_path: Path
) -> None:
    """`convert(quantize=QuantizeOptions(...))` gets the CLI's checks, before anything is
    written (they were skipped, and the folder recorded the impossible settings)."""
    with pytest.raises(LmexportError, match=word):
        lmexport.convert("llama-tiny", tmp_path / "out", quantize=options)
    assert not (tmp_path / "out").exists()
