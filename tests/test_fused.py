"""The fused targets: graph shape on a 4-layer model, float16, and runtimes that cannot run them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lmexport
from lmexport.errors import LmexportError
from lmexport.exporter import compat
from lmexport.models.llama import Llama, LlamaConfig, rope_inv_freq
from lmexport.models.presets import PRESETS

from helpers import assert_no_training_outputs

LAYERS = 4  # llama-tiny


@pytest.fixture(scope="module")
def ort_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lmexport.convert("llama-tiny", tmp_path_factory.mktemp("ort") / "out", target="ort")


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lmexport.convert("llama-tiny", tmp_path_factory.mktemp("onnx") / "out", target="onnx")


def load(folder: Path) -> tuple[onnx.ModelProto, Counter[str]]:
    model = onnx.load(str(folder / "model.onnx"))
    return model, Counter(n.op_type for n in model.graph.node)


def test_ort_graph_shape(ort_folder: Path) -> None:
    model, ops = load(ort_folder)
    assert len(model.graph.node) <= 60
    assert ops["GroupQueryAttention"] == LAYERS
    assert ops["SkipSimplifiedLayerNormalization"] + ops["RMSNormalization"] == 2 * LAYERS + 1
    for primitive in ("Softmax", "Tile", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div"):
        assert ops[primitive] == 0, primitive
    produced_by = {out: n for n in model.graph.node for out in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    for gqa in (n for n in model.graph.node if n.op_type == "GroupQueryAttention"):
        # Packed Q/K/V straight from their projection, past K/V straight from the graph inputs:
        # no repeat (Expand/Tile) of K/V anywhere on the attention path.
        assert produced_by[gqa.input[0]].op_type in ("MatMul", "Add")
        assert gqa.input[1] == gqa.input[2] == ""
        assert {gqa.input[3], gqa.input[4]} <= graph_inputs
    assert_no_training_outputs(model)
    manifest = json.loads((ort_folder / "lmexport.json").read_text())
    assert manifest["target"] == "ort"
    assert manifest["passes"]["export"]["GroupQueryAttention"] == LAYERS


def test_onnx_graph_shape(onnx_folder: Path) -> None:
    model, ops = load(onnx_folder)
    assert ops["Attention"] == LAYERS
    assert ops["RMSNormalization"] == 2 * LAYERS + 1
    assert ops["RotaryEmbedding"] == 2 * LAYERS
    assert ops["Softmax"] == 0
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in model.graph.node} == {""}
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 23


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_float16(target: str, tmp_path: Path) -> None:
    out = lmexport.convert("llama-tiny", tmp_path / "out", target=target, dtype="float16")
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    report = lmexport.verify(out, steps=16)
    assert report.passed, report.table()
    for check in ("logits", "kv_cache", "left_padding"):
        assert report.metrics[check]["top1"] >= 0.99
    assert report.metrics["greedy"]["top1"] >= 0.99
    # The rotary tables are float16 roundings of exact angles, not angles of float16-rounded
    # frequencies (0.1 rad off by llama-tiny's last position, 0.4 by position 8000).
    config = json.loads((out / "lmexport.json").read_text())["config"]
    inv_freq = rope_inv_freq(LlamaConfig(**config)).double().numpy()
    angles = np.outer(np.arange(config["max_position_embeddings"]), inv_freq)
    model = onnx.load(str(out / "model.onnx"))
    tables = [
        numpy_helper.to_array(t).astype(np.float64)
        for t in model.graph.initializer
        if tuple(t.dims) == angles.shape
    ]
    assert len(tables) == 2
    assert min(np.abs(t - np.cos(angles)).max() for t in tables) <= 1e-3
    assert min(np.abs(t - np.sin(angles)).max() for t in tables) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_frequencies_stay_float32(dtype: torch.dtype) -> None:
    config = PRESETS["llama-tiny"].config
    assert isinstance(config, LlamaConfig)
    model = Llama(config).to(dtype)
    assert model.lm_head.weight.dtype == dtype
    assert model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, rope_inv_freq(config))


def test_runtime_without_opset_23(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An onnxruntime that predates opset 23 is told so at convert time, naming the op."""
    real = compat.known_ops()
    older = {key: [v for v in versions if v < 23] for key, versions in real.items()}
    monkeypatch.setattr(compat, "known_ops", lambda: older)
    with pytest.raises(
        LmexportError,
        match=r"needs (Attention|RMSNormalization|RotaryEmbedding) "
        r"\(ai.onnx opset 23\)",
    ):
        lmexport.convert("llama-tiny", tmp_path / "out", target="onnx")
    assert not list(tmp_path.iterdir())
