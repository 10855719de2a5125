"""Prompts of different lengths as one batch: padded on the left, so that every row's next token
comes from the last column and the cache grows by one column for all rows at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import RuntimeInputError


def is_ragged(input_ids: Any) -> bool:
    """A list of token lists that are not all of one length."""
    if isinstance(input_ids, np.ndarray) or not isinstance(input_ids, Sequence):
        return False
    rows = list(input_ids)
    if not rows or not all(isinstance(r, Sequence | np.ndarray) for r in rows):
        return False
    return len({len(r) for r in rows}) > 1


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [batch, longest]: each row right-aligned, 0 in the mask where
    it is padding (the pad id itself is never attended to). Rows are checked as an array of
    equal rows is (`LlamaRunner`): integers only, never cast to int64 by truncation or wrap."""
    if not rows or any(len(r) == 0 for r in rows):
        raise RuntimeInputError("every prompt of a batch needs at least one token")
    arrays = [np.asarray(r) for r in rows]
    for row in arrays:
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise RuntimeInputError("every prompt must be a list of integer token ids")
        if row.max() > np.iinfo(np.int64).max:
            raise RuntimeInputError(f"token id {int(row.max())} is outside int64")
    width = max(len(r) for r in arrays)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(arrays):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask
