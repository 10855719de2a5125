"""`logits_to_keep`: every Llama export can run its LM head over the last positions only, which
generation asks for (the prompt's last logits), while callers that do not feed it get them all."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import lmexport
from lmexport.runtime import LlamaRunner
from lmexport.runtime.manifest import LOGITS_TO_KEEP, read_manifest
from lmexport.verify.llama import source_model

SEQ = 12


def feeds(runner: LlamaRunner, ids: np.ndarray, keep: int | None) -> dict[str, np.ndarray]:
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    past_names = [i.name for i in runner.session.get_inputs()][2:]
    out.update(zip(past_names, runner.empty_cache(len(ids)), strict=True))
    if keep is not None:
        out[LOGITS_TO_KEEP] = np.array(keep, dtype=np.int64)
    return out


@pytest.mark.parametrize("target", ["plain", "ort", "onnx"])
def test_graph_keeps_the_last_logits(target: str, tmp_path: Path) -> None:
    folder = lmexport.convert("llama-tiny", tmp_path / "out", target=target)
    runner = LlamaRunner.load(folder, threads=2)
    assert runner.keeps_logits
    ids = np.random.default_rng(0).integers(0, runner.vocab_size, (2, SEQ))
    model, _ = source_model(read_manifest(folder), None)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids))[0].numpy()
        last = model(torch.from_numpy(ids), logits_to_keep=3)[0].numpy()
    assert np.abs(last - reference[:, -3:]).max() <= 1e-5
    (everything,) = runner.session.run(["logits"], feeds(runner, ids, None))
    assert everything.shape == (2, SEQ, runner.vocab_size)
    assert np.abs(everything - reference).max() <= 1e-4
    for keep, kept in ((0, SEQ), (1, 1), (5, 5), (SEQ, SEQ), (40, SEQ)):
        (logits,) = runner.session.run(["logits"], feeds(runner, ids, keep))
        assert logits.shape == (2, kept, runner.vocab_size)
        assert np.abs(logits - everything[:, -kept:]).max() <= 1e-5


def test_prefill_of_the_last_logits_keeps_the_whole_cache(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder, threads=2, io_binding=False)
    ids = np.random.default_rng(1).integers(0, runner.vocab_size, (1, SEQ))
    everything = runner.logits(ids)
    last, past = runner.forward(ids[:, :8], np.ones((1, 8), np.int64), None, keep=1)
    assert last.shape == (1, 1, runner.vocab_size)
    assert np.abs(last - everything[:, 7:8]).max() <= 1e-5
    rest, _ = runner.forward(ids[:, 8:], np.ones((1, SEQ), np.int64), past)
    assert np.abs(rest - everything[:, 8:]).max() <= 1e-5
    for capacity in (None, SEQ):  # the bound cache's first step runs through session.run
        bound = runner.device_cache(1, capacity)
        first = bound.step(ids[:, :8], np.ones((1, 8), np.int64), keep=2)
        assert np.abs(first - everything[:, 6:8]).max() <= 1e-5
        rest = bound.step(ids[:, 8:], np.ones((1, SEQ), np.int64))
        assert np.abs(rest - everything[:, 8:]).max() <= 1e-5


def test_quantized_graph_keeps_it(tmp_path: Path) -> None:
    folder = lmexport.convert("llama-tiny", tmp_path / "int4", quantize="int4")
    runner = LlamaRunner.load(folder, threads=2)
    assert runner.keeps_logits
    ids = np.random.default_rng(2).integers(0, runner.vocab_size, (1, SEQ))
    (everything,) = runner.session.run(["logits"], feeds(runner, ids, None))
    (last,) = runner.session.run(["logits"], feeds(runner, ids, 1))
    assert last.shape == (1, 1, runner.vocab_size)
    assert np.abs(last - everything[:, -1:]).max() <= 1e-5


def test_optimize_keeps_it_overridable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = lmexport.convert("llama-tiny", tmp_path / "plain", target="plain")
    fused = tmp_path / "ort"
    with caplog.at_level(logging.WARNING):
        lmexport.optimize(plain, fused, target="ort")
    assert not [r for r in caplog.records if LOGITS_TO_KEEP in r.getMessage()]
    runner = LlamaRunner.load(fused, threads=2)
    assert runner.keeps_logits
    ids = np.random.default_rng(3).integers(0, runner.vocab_size, (1, SEQ))
    (last,) = runner.session.run(["logits"], feeds(runner, ids, 2))
    assert np.abs(last - runner.logits(ids)[:, -2:]).max() <= 1e-5


def test_graph_without_it_still_generates(tiny_folder: Path, tmp_path: Path) -> None:
    """A folder exported before the input existed: the runner cuts the logits itself."""
    folder = tmp_path / "old"
    folder.mkdir()
    for item in tiny_folder.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "model.onnx").unlink()
    model = onnx.load(str(tiny_folder / "model.onnx"))
    kept = [i for i in model.graph.input if i.name != LOGITS_TO_KEEP]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(folder / "model.onnx"))
    old, new = LlamaRunner.load(folder, threads=2), LlamaRunner.load(tiny_folder, threads=2)
    assert not old.keeps_logits
    ids = np.random.default_rng(4).integers(0, old.vocab_size, (2, SEQ))
    logits, _ = old.forward(ids, np.ones_like(ids), None, keep=2)
    assert logits.shape == (2, 2, old.vocab_size)
    assert np.array_equal(old.generate(ids, max_new_tokens=6), new.generate(ids, max_new_tokens=6))
