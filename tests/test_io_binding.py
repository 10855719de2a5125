"""The IO-binding decode (the CUDA path) run on 'cpu' OrtValues against the numpy cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmexport.runtime import LlamaRunner, left_pad

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1], [8, 2, 8, 1, 8]]


def test_bound_cache_matches_numpy_cache(tiny_folder: Path) -> None:
    """Prefill and 12 decode steps of a left-padded batch: the same logits at every step (to
    1e-5), the same cache contents, the same greedy tokens."""
    runner = LlamaRunner.load(tiny_folder, threads=1)
    ids, mask = left_pad(PROMPTS)
    bound = runner.device_cache(len(ids))
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


def test_generation_with_binding_equals_without(tiny_folder: Path) -> None:
    plain = LlamaRunner.load(tiny_folder)
    bound = LlamaRunner.load(tiny_folder, io_binding=True)
    assert not plain.io_binding and bound.io_binding and bound.provider == "cpu"
    assert np.array_equal(
        bound.generate(PROMPTS, 16, eos_token_id=[]), plain.generate(PROMPTS, 16, eos_token_id=[])
    )
    sampled = {"temperature": 0.9, "top_p": 0.9, "seed": 3, "eos_token_id": []}
    assert np.array_equal(
        bound.generate(PROMPTS, 16, **sampled), plain.generate(PROMPTS, 16, **sampled)
    )
