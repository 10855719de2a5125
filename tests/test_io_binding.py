"""The IO-binding decode run on 'cpu' OrtValues against the numpy cache: the growing cache (the
CUDA path) and the preallocated buffer GroupQueryAttention shares as past and present (the CPU
default for `ort` graphs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lmexport
from lmexport.errors import RuntimeInputError
from lmexport.runtime import LlamaRunner, left_pad

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1], [8, 2, 8, 1, 8]]


@pytest.mark.parametrize("capacity", [None, 21])
def test_bound_cache_matches_numpy_cache(tiny_folder: Path, capacity: int | None) -> None:
    """Prefill and 12 decode steps of a left-padded batch: the same logits at every step (to
    1e-5), the same cache contents, the same greedy tokens; a shared buffer exactly filled."""
    runner = LlamaRunner.load(tiny_folder, threads=1)
    ids, mask = left_pad(PROMPTS)
    bound = runner.device_cache(len(ids), capacity)
    assert bound.capacity == capacity
    past = None
    step_ids = ids
    for _ in range(13):
        expected, past = runner.forward(step_ids, mask, past)
        got = bound.step(step_ids, mask)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5
        assert all(np.array_equal(a, b) for a, b in zip(bound.host_copy(), past, strict=True))
        nxt = expected[:, -1].argmax(-1)
        assert np.array_equal(got[:, -1].argmax(-1), nxt)
        step_ids = nxt[:, None]
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
    assert bound.past is not None and all(v.device_name() == "cpu" for v in bound.past)
    assert bound.length == mask.shape[1] - 1 == 20


def test_generation_with_binding_equals_without(tiny_folder: Path) -> None:
    plain = LlamaRunner.load(tiny_folder, io_binding=False)
    bound = LlamaRunner.load(tiny_folder)  # an `ort` graph on the CPU: shared buffers
    assert not plain.io_binding and bound.io_binding and bound.shares_cache
    assert bound.provider == "cpu"
    assert np.array_equal(
        bound.generate(PROMPTS, 16, eos_token_id=[]), plain.generate(PROMPTS, 16, eos_token_id=[])
    )
    sampled = {"temperature": 0.9, "top_p": 0.9, "seed": 3, "eos_token_id": []}
    assert np.array_equal(
        bound.generate(PROMPTS, 16, **sampled), plain.generate(PROMPTS, 16, **sampled)
    )


def test_cache_lengths_are_checked(tiny_folder: Path) -> None:
    """A mask that does not cover the cache plus the new tokens, or a step past the buffer's
    capacity, is refused before onnxruntime reads past the valid slots."""
    runner = LlamaRunner.load(tiny_folder)
    bound = runner.device_cache(1, capacity=4)
    bound.step(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64))
    with pytest.raises(RuntimeInputError, match="cache holds 3"):
        bound.step(np.array([[4]]), np.ones((1, 5), np.int64))
    bound.step(np.array([[4]]), np.ones((1, 4), np.int64))
    with pytest.raises(RuntimeInputError, match="exceed the cache's 4"):
        bound.step(np.array([[5]]), np.ones((1, 5), np.int64))
    with pytest.raises(RuntimeInputError, match="cut back"):
        runner.device_cache(1).keep(0)


def test_plain_graphs_do_not_share(tmp_path: Path) -> None:
    """A plain graph concatenates its cache inside: no shared buffer, numpy by default."""
    runner = LlamaRunner.load(lmexport.convert("llama-tiny", tmp_path / "out", target="plain"))
    assert not runner.shares_cache and not runner.io_binding
    assert runner.device_cache(1, capacity=8).capacity is None


def test_grouped_rows_one_at_a_time(tiny_folder: Path) -> None:
    """GroupQueryAttention takes several new tokens over a cache for batch 1 only: a bound
    cache says so instead of passing onnxruntime's error on (`forward` splits the rows)."""
    runner = LlamaRunner.load(tiny_folder)
    bound = runner.device_cache(2, capacity=8)
    bound.step(np.array([[1, 2, 3], [4, 5, 6]]), np.ones((2, 3), np.int64))
    with pytest.raises(RuntimeInputError, match="one row at a time"):
        bound.step(np.array([[7, 8], [9, 10]]), np.ones((2, 5), np.int64))


def test_shared_buffer_only_where_every_layer_is_grouped(tiny_folder: Path, tmp_path: Path) -> None:
    """The shared buffer needs GroupQueryAttention in every layer: a folder whose manifest says
    `ort` but whose attention was not fused (optimize keeps the target it was asked for) runs
    with the cache a plain graph gets."""
    folder = lmexport.convert("llama-tiny", tmp_path / "out", target="onnx")
    manifest = json.loads((folder / "lmexport.json").read_text())
    manifest["target"] = "ort"
    (folder / "lmexport.json").write_text(json.dumps(manifest))
    runner = LlamaRunner.load(folder)
    assert not runner.shares_cache and not runner.io_binding
    expected = LlamaRunner.load(tiny_folder).generate(PROMPTS, 6, eos_token_id=[])
    assert np.array_equal(runner.generate(PROMPTS, 6, eos_token_id=[]), expected)
