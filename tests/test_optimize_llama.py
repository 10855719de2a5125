"""`optimize` on whole Llama graphs: our plain export and Hugging Face transformers exports."""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lmexport

from helpers import assert_bad_input, assert_no_training_outputs, random_transformers_llama

LAYERS = 4  # llama-tiny


@pytest.fixture(scope="module")
def plain_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain")
    return {
        "kv": lmexport.convert("llama-tiny", root / "kv", target="plain"),
        "no_kv": lmexport.convert("llama-tiny", root / "no_kv", target="plain", kv_cache=False),
    }


@pytest.fixture(scope="module")
def ort_node_counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What `convert --target ort` makes of the same model: the bar for `optimize`."""
    root = tmp_path_factory.mktemp("ort")
    counts = {}
    for cache, kv in (("kv", True), ("no_kv", False)):
        folder = lmexport.convert("llama-tiny", root / cache, target="ort", kv_cache=kv)
        counts[cache] = len(onnx.load(str(folder / "model.onnx")).graph.node)
    return counts


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def optimized_folder(folder: Path, target: str, dest: Path) -> tuple[Path, onnx.ModelProto]:
    """`lmexport optimize FOLDER -o DEST`: a converted folder with its graph fused."""
    report = lmexport.optimize(folder, dest, target=target)
    manifest = json.loads((dest / "lmexport.json").read_text())
    assert manifest["target"] == target and manifest["opset"] == 23
    assert manifest["passes"]["optimize"] == report.applied_by_fusion()
    assert report.max_diff is not None and report.max_diff <= 1e-4
    return dest, onnx.load(str(dest / "model.onnx"))


@pytest.mark.parametrize("cache", ["kv", "no_kv"])
def test_plain_export_to_ort(
    plain_folders: dict[str, Path], ort_node_counts: dict[str, int], cache: str, tmp_path: Path
) -> None:
    folder, fused = optimized_folder(plain_folders[cache], "ort", tmp_path / "opt")
    counts = ops(fused)
    assert counts["GroupQueryAttention"] == LAYERS
    assert len(fused.graph.node) <= 1.2 * ort_node_counts[cache]
    assert_no_training_outputs(fused)
    for op in ("Softmax", "Tile", "ReduceMean", "Pow"):
        assert counts[op] == 0, op
    producers = {o: n for n in fused.graph.node for o in n.output}
    for gqa in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        for name in gqa.input[:5]:
            assert name == "" or producers.get(name) is None or producers[name].op_type != "Expand"
    # onnxruntime-genai can run it, as a `convert --target ort` folder (cached graphs only).
    assert (folder / "genai_config.json").is_file() == (cache == "kv")
    report = lmexport.verify(folder, steps=16)  # PyTorch vs the optimized graph, end to end
    assert report.passed, report.table()
    assert report.metrics["logits"]["max_abs"] <= 1e-4
    assert report.metrics["left_padding"]["max_abs"] <= 1e-4


@pytest.mark.parametrize("cache", ["kv", "no_kv"])
def test_plain_export_to_onnx(plain_folders: dict[str, Path], cache: str, tmp_path: Path) -> None:
    folder, fused = optimized_folder(plain_folders[cache], "onnx", tmp_path / "opt")
    counts = ops(fused)
    assert counts["Attention"] == LAYERS
    assert counts["RotaryEmbedding"] == 2 * LAYERS
    assert counts["RMSNormalization"] == 2 * LAYERS + 1
    assert counts["Softmax"] == 0 and {n.domain for n in fused.graph.node} == {""}
    assert not (folder / "genai_config.json").exists()
    report = lmexport.verify(folder, steps=16)
    assert report.passed, report.table()


def test_folder_of_another_target_refused(tmp_path: Path) -> None:
    """An `ort` folder's graph keeps its com.microsoft ops: `--target onnx` would record a
    standard-ops folder that is not one."""
    folder = lmexport.convert("llama-tiny", tmp_path / "ort")
    assert_bad_input(["optimize", str(folder), "-o", str(tmp_path / "o"), "--target", "onnx"],
                     "`ort` export", "--target plain")  # fmt: skip
    assert not (tmp_path / "o").exists()


def export_transformers(impl: str, path: Path) -> torch.nn.Module:
    model = random_transformers_llama(attn_implementation=impl)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    ids = torch.randint(0, 256, (2, 5))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Logits(),
            (ids, torch.ones_like(ids)),
            dynamo=True,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    return model


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_export(impl: str, target: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")  # the other tests here need only lmexport
    model = export_transformers(impl, tmp_path / "hf.onnx")
    out = tmp_path / "opt.onnx"
    report = lmexport.optimize(tmp_path / "hf.onnx", out, target=target)
    applied = {f.name: f.applied for f in report.fusions}
    fused = onnx.load(str(out))
    counts = ops(fused)
    assert counts["GroupQueryAttention" if target == "ort" else "Attention"] == 2
    assert counts["Softmax"] == 0 and counts["ReduceMean"] == 0
    assert applied["rotary"] == 4 and applied["rms_norm"] == 5

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, size=(2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= 1e-4
    assert json.dumps(report.to_dict())  # the report serialises
