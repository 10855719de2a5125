"""Seeded inputs for parity checks: the same ids reach PyTorch and onnxruntime."""

from __future__ import annotations

import numpy as np


def random_ids(rng: np.random.Generator, vocab: int, batch: int, length: int) -> np.ndarray:
    return rng.integers(0, vocab, size=(batch, length), dtype=np.int64)


def left_pad(rows: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompts of different lengths, padding on the left: (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask
