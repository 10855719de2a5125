"""`convert --streaming`: the same graph and weights as the in-memory export, byte for byte (Hugging
Face and Meta folders, cast and int4), parity with PyTorch, a 155M-parameter model converted in a
subprocess under a derived peak-RSS bound, progress lines, and a full disk."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import save_file
from test_meta_checkpoints import Params, random_meta_model, write_meta_folder

import lmexport
from lmexport.exporter import streaming
from lmexport.exporter.progress import Progress
from lmexport.exporter.weights_file import CHUNK_BYTES, DataFile
from lmexport.models.checkpoints.lazy import expected_shapes
from lmexport.models.llama import LlamaConfig
from lmexport.models.presets import PRESETS
from lmexport.quantize import quantize_options
from lmexport.runtime import LlamaRunner

from helpers import assert_bad_input, hf_config_json, run, small_config, write_hf_folder

# Big enough that the MLP weights and the embedding (> skeleton.SMALL elements) are streamed,
# while Q/K/V and the norms are read before tracing: both paths are exercised.
STREAMED = small_config(hidden_size=256, intermediate_size=768, head_dim=None, vocab_size=512)
MiB = 1 << 20


def load_export(folder: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph with its initializers' data taken out, and the data by name."""
    model = onnx.load(str(folder / "model.onnx"))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("external_data")
        t.data_location = onnx.TensorProto.DEFAULT
    return model, arrays


def assert_same_export(expected: Path, got: Path) -> dict[str, Any]:
    """Same graph, same initializers byte for byte; returns the manifest keys that differ."""
    graph_a, arrays_a = load_export(expected)
    graph_b, arrays_b = load_export(got)
    assert list(arrays_a) == list(arrays_b)
    for name, a in arrays_a.items():
        b = arrays_b[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert a.tobytes() == b.tobytes(), name
    assert graph_a.SerializeToString() == graph_b.SerializeToString()
    manifest_a = json.loads((expected / "lmexport.json").read_text())
    manifest_b = json.loads((got / "lmexport.json").read_text())
    return {
        k: (manifest_a[k], manifest_b.get(k))
        for k in manifest_a
        if manifest_a[k] != manifest_b.get(k)
    }


def test_hf_sharded_bf16_to_float16_tied(tmp_path: Path) -> None:
    tied = dataclasses.replace(STREAMED, tie_word_embeddings=True)
    write_hf_folder(tmp_path / "hf", tied, dtype=torch.bfloat16, shards=3)
    for streamed in (False, True):
        name = "streamed" if streamed else "in_memory"
        lmexport.convert(str(tmp_path / "hf"), tmp_path / name, dtype="float16", streaming=streamed)
    assert assert_same_export(tmp_path / "in_memory", tmp_path / "streamed") == {}
    assert (tmp_path / "streamed" / "model.onnx.data").is_file()


def test_meta_two_shards_plain_target(tmp_path: Path) -> None:
    """Meta's shards, each tensor joined from both (the embedding split by vocabulary rows)."""
    params = Params(dim=256, vocab_size=512)
    write_meta_folder(tmp_path / "meta", random_meta_model(params), 2, embedding_dim=0)
    for streamed in (False, True):
        name = "streamed" if streamed else "in_memory"
        lmexport.convert(
            str(tmp_path / "meta"), tmp_path / name, target="plain", streaming=streamed
        )
    assert assert_same_export(tmp_path / "in_memory", tmp_path / "streamed") == {}


@pytest.mark.parametrize("offsets", [False, True], ids=["zero_points", "float_offsets"])
def test_int4_streams_to_the_in_memory_int4_graph(tmp_path: Path, offsets: bool) -> None:
    """The MatMulNBits codes, scales and zero points (or float offsets), quantized a block of
    rows at a time, equal convert --quantize int4's; only the accuracy measurement is left out."""
    write_hf_folder(tmp_path / "hf", STREAMED, dtype=torch.bfloat16, shards=2)
    options = quantize_options("int4", offsets=offsets)
    for streamed in (False, True):
        name = "streamed" if streamed else "in_memory"
        lmexport.convert(
            str(tmp_path / "hf"), tmp_path / name, quantize=options, streaming=streamed
        )
    differ = assert_same_export(tmp_path / "in_memory", tmp_path / "streamed")
    assert list(differ) == ["quantization"]
    measured, streamed_record = differ["quantization"]
    assert streamed_record == {**measured, "accuracy": None}
    assert measured["ops"]["MatMulNBits"] == 2 * 5 + 1  # QKV, O, gate, up, down; the LM head


def test_streamed_fp32_matches_pytorch_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder above the automatic threshold (lowered here) streams without --streaming,
    prints one line per phase when stderr is not a terminal, and the result matches PyTorch and
    passes `verify` (which checks the streamed weights' sha256 against the source's)."""
    model = write_hf_folder(tmp_path / "hf", STREAMED, shards=2)
    monkeypatch.setattr(streaming, "AUTO_STREAMING_BYTES", 0)
    code, out, err = run("convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out"))
    assert code == 0 and out.startswith("wrote"), err
    phases = [line.split(":")[0] for line in err.splitlines()]
    assert phases == ["trace", "digest", "weights", "save"], err
    assert "peak RSS" in err and "tensors" in err
    folder = tmp_path / "out"
    assert (folder / "model.onnx.data").is_file() and (folder / "model.onnx").stat().st_size < MiB
    ids = np.random.default_rng(0).integers(0, STREAMED.vocab_size, size=(2, 12))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids))[0].numpy()
    got = LlamaRunner.load(folder, threads=2).logits(ids)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected).max() > 1.0
    report = lmexport.verify(folder, steps=4)
    assert report.passed, report.table()


# --- a medium model in a subprocess: peak memory ------------------------------------------------

CHILD = """
import json, sys
import numpy, onnx, onnx_ir, onnxruntime, onnxscript, safetensors, torch  # what a convert imports
import lmexport.exporter.convert
from lmexport.exporter.progress import peak_rss
baseline = peak_rss()
from lmexport.cli import cli
cli.main(sys.argv[1:], standalone_mode=False)
print(json.dumps({"baseline": baseline, "peak": peak_rss()}))
"""


def convert_in_child(*args: str) -> dict[str, int]:
    """Peak RSS as the converting process itself counts it (progress.peak_rss), after its
    imports and at the end."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "convert", *args],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def write_sharded_folder(folder: Path, config: LlamaConfig, seed: int = 0) -> int:
    """A bfloat16 Hugging Face folder written one tensor at a time, a shard per layer; returns
    the parameter count."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config_json(config)))
    shapes = expected_shapes(config)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        shards.setdefault(name.split(".")[2] if ".layers." in name else "top", []).append(name)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards.values()):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        part = {}
        for name in names:
            scale = 1.0 if "embed" in name else 1 / math.sqrt(shapes[name][-1])
            t = torch.randn(shapes[name], generator=gen) * scale
            part[name] = (1 + 0.1 * t if name.endswith("norm.weight") else t).to(torch.bfloat16)
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(math.prod(s) for s in shapes.values())


# Tracing the fake-weight model (torch.export and the ONNX graph, no weights): measured at
# 120 MiB for llama-bench's 8 layers.
TRACE_BUDGET = 192 * MiB


@pytest.mark.slow
def test_medium_model_streams_in_bounded_memory(tmp_path: Path) -> None:
    """llama-bench's shape (155M parameters, 594 MiB in float32) streamed from bfloat16 shards.
    Bound: the child's RSS after its imports, plus the trace, plus twice the largest tensor in
    float32 (a transposed weight is read whole, then cast a block at a time) and four blocks
    (weights_file.CHUNK_BYTES: the rows read, their float32 copy, the cast, the transposed
    copy). The whole model would not fit in it."""
    config = PRESETS["llama-bench"].config
    params = write_sharded_folder(tmp_path / "hf", config)
    assert params >= 100_000_000
    largest = 4 * max(math.prod(s) for s in expected_shapes(config).values())
    rss = convert_in_child(str(tmp_path / "hf"), "-o", str(tmp_path / "streamed"), "--streaming")
    bound = rss["baseline"] + TRACE_BUDGET + 2 * largest + 4 * CHUNK_BYTES
    assert bound < rss["baseline"] + 4 * params  # holding the float32 model would break it
    assert rss["peak"] <= bound, (rss["peak"] / MiB, bound / MiB)

    in_memory = convert_in_child(
        str(tmp_path / "hf"), "-o", str(tmp_path / "in_memory"), "--no-streaming", "--quiet"
    )
    assert in_memory["peak"] > rss["peak"] + 4 * params  # what streaming saves
    assert assert_same_export(tmp_path / "in_memory", tmp_path / "streamed") == {}
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, 16))
    logits = [
        LlamaRunner.load(tmp_path / f, threads=2).logits(ids) for f in ("in_memory", "streamed")
    ]
    assert np.array_equal(logits[0], logits[1])


# --- bad input ----------------------------------------------------------------------------------


def test_disk_full_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_hf_folder(tmp_path / "hf", STREAMED)
    writes = []

    def fill_up(self: DataFile, offset: int, data: np.ndarray) -> None:
        writes.append(offset)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DataFile, "write", fill_up)
    args = ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--streaming", "-q"]
    assert_bad_input(args, "disk full", "model.onnx.data")
    assert len(writes) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary folder


def test_too_little_free_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_hf_folder(tmp_path / "hf", STREAMED)
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda _: SimpleNamespace(free=1000))
    args = ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--streaming", "-q"]
    assert_bad_input(args, "the weights need", "1000 B free")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["llama-tiny"], ["llama-tiny", "model folder"]),
        (["llama-tiny", "--adapter", "x"], ["--adapter"]),
    ],
    ids=["preset", "adapter"],
)
def test_streaming_refuses_what_it_cannot_stream(
    tmp_path: Path, extra: list[str], words: list[str]
) -> None:
    assert_bad_input(["convert", *extra, "-o", str(tmp_path / "out"), "--streaming"], *words)
    assert not (tmp_path / "out").exists()


def test_automatic_streaming_does_not_blame_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that streams without --streaming (threshold lowered here), given --image-size:
    the refusal named --streaming, which the user never gave."""
    write_hf_folder(tmp_path / "hf", small_config())
    monkeypatch.setattr(streaming, "AUTO_STREAMING_BYTES", 0)
    args = ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--image-size", "64"]
    assert_bad_input(args, "--image-size applies to HorNet models only")
    assert "--streaming" not in run(*args)[2]
    assert not (tmp_path / "out").exists()


def test_progress_bars_on_a_terminal() -> None:
    class Terminal:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    terminal = Terminal()
    with Progress(True, terminal).phase("weights", tensors=2, nbytes=3 * MiB) as phase:  # type: ignore[arg-type]
        phase.advance(tensors=1, nbytes=MiB)
        phase.advance(tensors=1, nbytes=2 * MiB)
    assert "weights" in terminal.text and "2/2 tensors" in terminal.text
    assert "3.00M" in terminal.text  # bytes, scaled
    quiet = Terminal()
    with Progress(False, quiet).phase("weights", 1, 1) as phase:  # type: ignore[arg-type]
        phase.advance(1, 1)
    assert quiet.text == ""
