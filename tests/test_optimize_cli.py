"""`lmexport optimize` on files: the fused result, its parity proof, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import lmexport

from helpers import assert_bad_input, run


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = lmexport.convert("llama-tiny", tmp_path_factory.mktemp("plain") / "out", target="plain")
    return out / "model.onnx"


def test_optimize_plain_export(plain_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused.onnx"
    code, text, err = run(
        "optimize", str(plain_model), "-o", str(out), "--report", str(tmp_path / "r.json")
    )
    assert code == 0, err
    assert "rms_norm" in text and "parity before/after" in text
    report = json.loads((tmp_path / "r.json").read_text())
    applied = {f["name"]: f["applied"] for f in report["fusions"]}
    assert applied == {
        "rms_norm": 9,
        "rotary": 8,
        "attention": 4,
        "group_query_attention": 4,
        "qkv_packing": 4,
        "skip_rms_norm": 8,
        "silu": 4,
    }
    assert report["max_diff"] <= 1e-4
    assert report["nodes_after"] < report["nodes_before"]
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "ReduceMean" not in ops and ops.count("SkipSimplifiedLayerNormalization") == 8


def rotary_rows(path: Path) -> set[int]:
    model = onnx.load(str(path))
    return {t.dims[0] for t in model.graph.initializer if t.name.startswith("rotary_cos")}


def test_max_positions(plain_model: Path, tmp_path: Path) -> None:
    """A graph that computes its angles gets a cache of 8192 rows, or as many as asked."""
    for args, rows in (([], 8192), (["--max-positions", "1024"], 1024)):
        out = tmp_path / f"fused{rows}.onnx"
        code, _, err = run("optimize", str(plain_model), "-o", str(out), *args)
        assert code == 0, err
        assert rotary_rows(out) == {rows}
    assert_bad_input(
        ["optimize", str(plain_model), "-o", str(tmp_path / "x.onnx"), "--max-positions", "3"],
        "--max-positions 3",
    )
    assert not (tmp_path / "x.onnx").exists()


def test_graph_without_llama_pattern(tmp_path: Path) -> None:
    """Nothing to fuse is not an error: zero fusions, exit 0, the graph written unchanged."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    src = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(src))
    code, text, err = run("optimize", str(src), "-o", str(tmp_path / "out.onnx"))
    assert code == 0, err
    assert "applied 0" in text
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node] == ["Relu"]


def test_not_onnx(tmp_path: Path) -> None:
    src = tmp_path / "notes.onnx"
    src.write_text("this is not a protobuf")
    assert_bad_input(["optimize", str(src), "-o", str(tmp_path / "o.onnx")], "notes.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_truncated(plain_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "cut.onnx"
    src.write_bytes(plain_model.read_bytes()[:5000])
    assert_bad_input(["optimize", str(src), "-o", str(tmp_path / "o.onnx")], "cut.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.onnx"]


def test_external_data_missing(plain_model: Path, tmp_path: Path) -> None:
    model = onnx.load(str(plain_model))
    src = tmp_path / "ext.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="ext.onnx.data")
    (tmp_path / "ext.onnx.data").unlink()
    assert_bad_input(["optimize", str(src), "-o", str(tmp_path / "o.onnx")], "ext.onnx.data")
    assert not (tmp_path / "o.onnx").exists()


def test_missing_file(tmp_path: Path) -> None:
    assert_bad_input(["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")])
