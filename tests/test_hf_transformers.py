"""A folder written by Hugging Face transformers converts and matches transformers' logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lmexport
from lmexport.runtime import LlamaRunner

from helpers import random_transformers_llama

transformers = pytest.importorskip("transformers")


def save_random_llama(folder: Path, **overrides: object) -> torch.nn.Module:
    model = random_transformers_llama(**overrides)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("target", ["ort", "onnx", "plain"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "head_dim": 24,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ],
    ids=["plain_config", "llama3_rope_tied_head_dim"],
)
def test_matches_transformers(tmp_path: Path, overrides: dict[str, object], target: str) -> None:
    reference = save_random_llama(tmp_path / "hf", **overrides)
    out = lmexport.convert(str(tmp_path / "hf"), tmp_path / "out", target=target)
    runner = LlamaRunner.load(out)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    got = runner.logits(ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= 1e-4
    assert np.abs(got).max() > 0.1  # not a degenerate model

    with torch.no_grad():
        hf_tokens = reference.generate(
            torch.from_numpy(ids[:1]), max_new_tokens=16, do_sample=False, eos_token_id=None
        )[0, 12:].numpy()
    assert (runner.generate(ids[:1], 16, eos_token_id=[])[0] == hf_tokens).all()
