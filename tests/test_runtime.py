"""The runtime alone: no torch, cache handling, batching and stopping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmexport.errors import RuntimeInputError
from lmexport.runtime import LlamaRunner

from helpers import assert_bad_input

NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now fails
import numpy as np
from lmexport.runtime import LlamaRunner
runner = LlamaRunner.load(sys.argv[1])
print(" ".join(map(str, runner.generate(np.array([[1, 2, 3]]), 5, eos_token_id=[])[0])))
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
"""


def test_runtime_without_torch(tiny_folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tiny_folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = LlamaRunner.load(tiny_folder).generate([[1, 2, 3]], 5, eos_token_id=[])[0]
    assert done.stdout.split() == [str(t) for t in expected]


def test_cached_decode_equals_full_forward(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder, threads=1)
    ids = np.random.default_rng(3).integers(0, runner.vocab_size, size=(1, 10))
    tokens = runner.generate(ids, 6, eos_token_id=[])[0]
    full = runner.logits(np.concatenate([ids, tokens[None, :-1]], axis=1))
    assert (full[0, 9:].argmax(-1) == tokens).all()


def test_chunk_over_a_cache_with_several_rows(tiny_folder: Path) -> None:
    """Several new tokens per row over a cache (speculative verification, chunked prefill),
    left padding included: the same logits as one forward over everything."""
    runner = LlamaRunner.load(tiny_folder, threads=1)
    ids = np.random.default_rng(5).integers(0, runner.vocab_size, size=(3, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    _, cache = runner.forward(ids[:, :6], mask[:, :6], None)
    chunk, _ = runner.forward(ids[:, 6:], mask, cache)
    full, _ = runner.forward(ids, mask, None)
    np.testing.assert_allclose(chunk, full[:, 6:], atol=1e-4)


def test_stops_at_eos(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    free = runner.generate([[5, 6, 7]], 10, eos_token_id=[])[0]
    stopped = runner.generate([[5, 6, 7]], 10, eos_token_id=int(free[3]))[0]
    first = list(free).index(free[3])
    assert list(stopped) == list(free[: first + 1])


def test_batch_rows_match_single_rows(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    rows = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1]]
    ids = np.zeros((2, 8), np.int64)
    mask = np.zeros((2, 8), np.int64)
    for i, r in enumerate(rows):
        ids[i, 8 - len(r) :], mask[i, 8 - len(r) :] = r, 1
    batched = runner.generate(ids, 8, attention_mask=mask, eos_token_id=[])
    for i, r in enumerate(rows):
        assert (batched[i] == runner.generate([r], 8, eos_token_id=[])[0]).all()


def test_right_padding_refused(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    with pytest.raises(RuntimeInputError, match="left"):
        runner.logits([[1, 2, 0]], [[1, 1, 0]])


def test_context_limit(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    with pytest.raises(RuntimeInputError, match="context"):
        runner.generate([[1] * 500], 100)


def test_eos_token_id_as_a_numpy_integer(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    free = runner.generate([[1, 2, 3]], 8, eos_token_id=[])[0]
    stopped = runner.generate([[1, 2, 3]], 8, eos_token_id=free[3])  # an np.int64
    first = list(free).index(free[3])
    assert list(stopped[0]) == list(free[: first + 1])


@pytest.mark.parametrize(
    ("rows", "word"),
    [
        ([[1, 2], [2**70]], "integer"),
        ([[1, 2], [1.7]], "integer"),  # not truncated to token 1
        ([[1, 2], [2**63]], "int64"),
        ([[1, 2], [600]], "vocabulary"),
    ],
)
def test_prompts_of_different_lengths_checked(
    tiny_folder: Path, rows: list[list[Any]], word: str
) -> None:
    with pytest.raises(RuntimeInputError, match=word):
        LlamaRunner.load(tiny_folder).generate(rows, 2)


def test_cli_prompts_of_different_lengths_checked(tiny_folder: Path) -> None:
    assert_bad_input(
        ["generate", str(tiny_folder), "--ids", "1,2", "--ids", str(10**23)], "integer"
    )
