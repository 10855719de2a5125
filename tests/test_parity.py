"""Every model shape the spine promises, exported and checked end to end by `verify`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmexport
from lmexport.verify import Report

from helpers import assert_bad_input, small_config, write_hf_folder

CONFIGS = {
    "mha": small_config(num_key_value_heads=4),
    "gqa": small_config(num_key_value_heads=2),
    "mqa": small_config(num_key_value_heads=1),
    "head_dim_not_hidden_over_heads": small_config(head_dim=24, num_key_value_heads=2),
    "tied_embeddings": small_config(tie_word_embeddings=True),
    "llama3_rope": small_config(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "attention_and_mlp_bias": small_config(attention_bias=True, mlp_bias=True),
}


def assert_fp32_parity(report: Report, steps: int = 32) -> None:
    assert report.passed, report.table()
    metrics = report.metrics
    for check in ("logits", "left_padding"):
        assert metrics[check]["max_abs"] <= 1e-4
    assert metrics["greedy"]["identical_prefix"] == steps
    assert metrics["left_padding"]["greedy_rows_identical"] == 2


TARGETS = ["plain", "ort", "onnx"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_parity(name: str, target: str, tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "hf", CONFIGS[name], seed=1)
    out = lmexport.convert(str(tmp_path / "hf"), tmp_path / "out", target=target)
    report = lmexport.verify(out)
    assert_fp32_parity(report)
    assert report.metrics["kv_cache"]["max_abs"] <= 1e-4


@pytest.mark.parametrize("target", TARGETS)
def test_sharded_bf16_folder(target: str, tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "hf", CONFIGS["gqa"], seed=2, dtype=torch.bfloat16, shards=3)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) == 3
    out = lmexport.convert(str(tmp_path / "hf"), tmp_path / "out", target=target)
    assert_fp32_parity(lmexport.verify(out))


def test_preset_tiny(tiny_folder: Path) -> None:
    report = lmexport.verify(tiny_folder)
    assert_fp32_parity(report)
    assert report.metrics["kv_cache"]["max_abs"] <= 1e-4


@pytest.mark.parametrize("target", TARGETS)
def test_without_kv_cache(target: str, tmp_path: Path) -> None:
    out = lmexport.convert("llama-tiny", tmp_path / "out", target=target, kv_cache=False)
    report = lmexport.verify(out, steps=8)
    assert_fp32_parity(report, steps=8)
    assert "kv_cache" not in report.metrics


def test_verify_catches_a_changed_weight(tiny_folder: Path, tmp_path: Path) -> None:
    """A folder whose graph drifted from its source must fail, with the numbers that show it."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    model = onnx.load(str(broken / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(init).copy()
    array *= 1.01  # a 1% drift, far above the 1e-4 tolerance
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(broken / "model.onnx"))
    report = lmexport.verify(broken)
    assert not report.passed
    assert report.metrics["logits"]["max_abs"] > 1e-4


def test_float16_plain(tmp_path: Path) -> None:
    out = lmexport.convert("llama-tiny", tmp_path / "out", target="plain", dtype="float16")
    report = lmexport.verify(out, steps=16)
    assert report.passed, report.table()
    assert report.metrics["greedy"]["top1"] >= 0.99
    assert 0 < report.metrics["logits"]["max_abs"] < 0.05  # fp16, so not bit-identical


def test_short_context_is_verified_within_it(tmp_path: Path) -> None:
    """The KV-cache check (8 + 32 positions) and the left-padded prompts with their greedy
    tokens used to run past max_position_embeddings: onnxruntime's traceback (GroupQueryAttention's
    cos_cache) and exit 1 instead of a report. They are cut to the context."""
    write_hf_folder(tmp_path / "hf", small_config(max_position_embeddings=16), seed=1)
    out = lmexport.convert(str(tmp_path / "hf"), tmp_path / "out")
    report = lmexport.verify(out, steps=8)
    assert_fp32_parity(report, steps=8)
    inputs = {c.name: c.inputs for c in report.checks}
    assert inputs["logits"] == "batch 2 x 16 random ids"
    assert inputs["kv_cache"] == "prefill 8 then 8 one-token decode steps vs the full forward"
    assert inputs["left_padding"] == "batch of prompts of 8 and 3 ids, left-padded"


def test_short_context_quantized(tmp_path: Path) -> None:
    """A low-precision folder's 4x lengths (logits 64, KV cache 136, padded prompts 44 and 20,
    the quantized compute check 64) are cut to its context too, as are convert's accuracy
    prompts (48 random ids). int8, whose parity is exact against the source quantized alike."""
    write_hf_folder(tmp_path / "hf", small_config(max_position_embeddings=40), seed=1)
    out = lmexport.convert(str(tmp_path / "hf"), tmp_path / "out", quantize="int8")
    accuracy = json.loads((out / "lmexport.json").read_text())["quantization"]["accuracy"]
    assert "x 40 random ids" in accuracy["inputs"], accuracy
    report = lmexport.verify(out, steps=32)
    assert report.passed, report.table()
    inputs = {c.name: c.inputs for c in report.checks}
    assert inputs["logits"] == "batch 2 x 40 random ids"
    assert inputs["kv_cache"] == "prefill 8 then 32 one-token decode steps vs the full forward"
    assert inputs["left_padding"] == "batch of prompts of 32 and 14 ids, left-padded"
    assert inputs["quantized_compute"].startswith("batch 2 x 40 random ids")


def test_check_lengths_unchanged_for_long_contexts(tiny_folder: Path) -> None:
    from lmexport.verify.llama import check_lengths

    usual = {"logits": 16, "kv_cache": 40, "pad_long": 11, "pad_short": 5, "compute": 64}
    assert check_lengths(1, 32, 512) == usual
    assert check_lengths(4, 32, 2048) == {
        "logits": 64, "kv_cache": 136, "pad_long": 44, "pad_short": 20, "compute": 64
    }  # fmt: skip
    inputs = {c.name: c.inputs for c in lmexport.verify(tiny_folder).checks}
    assert inputs["logits"] == "batch 2 x 16 random ids"
    assert inputs["kv_cache"] == "prefill 8 then 32 one-token decode steps vs the full forward"
    assert inputs["left_padding"] == "batch of prompts of 11 and 5 ids, left-padded"


def test_context_too_short_for_any_check(tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "hf", small_config(max_position_embeddings=8))
    out = lmexport.convert(str(tmp_path / "hf"), tmp_path / "out")
    assert_bad_input(["verify", str(out), "--steps", "1"], "context of at least 9", "is 8")
