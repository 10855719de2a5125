"""`model.onnx.data` of a streamed export, written piece by piece at offsets planned beforehand.

Every initializer's place in the file is fixed before the first byte is written (its size
follows from its shape), so a quantized weight's codes, scales and zero points can each be
written row block by row block at their own offsets, and the disk space needed is known up front.
Each piece is a block of rows of at most CHUNK_BYTES of float32: what one write holds in memory
besides the source tensor it comes from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..models.checkpoints.lazy import LazyCheckpoint
from ..quantize import quantize_blocks
from .skeleton import Recipe, to_numpy

CHUNK_BYTES = 16 << 20


class DataFile:
    """The external data file, open for writing at any offset (`os.pwrite`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0  # bytes allocated so far
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)

    def allocate(self, nbytes: int) -> int:
        offset, self.size = self.size, self.size + nbytes
        return offset

    def write(self, offset: int, data: np.ndarray) -> None:
        view = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        os.close(self._fd)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """As `convert` casts: loaded into a float32 model, then the model to `dtype`."""
    return tensor.to(torch.float32).to(dtype)


def _row_blocks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges of at most CHUNK_BYTES (`row_bytes`: a row's size in float32)."""
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def write_recipe(
    recipe: Recipe,
    checkpoint: LazyCheckpoint,
    out: DataFile,
    offset: int,
    done: Callable[[int], None],
) -> None:
    """The initializer `recipe` describes, at `offset`; `done(nbytes)` after each piece."""
    if not recipe.transpose:
        for name in recipe.sources:
            shape = checkpoint.shapes[name]
            for start, stop in _row_blocks(shape[0], math.prod(shape[1:]) * 4):
                piece = to_numpy(_cast(checkpoint.rows(name, start, stop), recipe.dtype))
                out.write(offset, piece)
                offset += piece.nbytes
                done(piece.nbytes)
        return
    # [cols, rows] of the stacked sources: every piece needs a block of each source's columns.
    sources = [checkpoint.read(name) for name in recipe.sources]
    rows = sum(s.shape[0] for s in sources)
    for start, stop in _row_blocks(recipe.shape[0], rows * 4):
        stacked = torch.cat([s[:, start:stop] for s in sources])
        piece = to_numpy(_cast(stacked, recipe.dtype).T.contiguous())
        out.write(offset, piece)
        offset += piece.nbytes
        done(piece.nbytes)


@dataclasses.dataclass
class QuantizedWeight:
    """One weight quantized as `quantize_blocks` does, [rows, cols] = its sources stacked;
    `parts` maps a BlockQuantized field (codes, scales, zero_points, offsets) to its
    initializer, and `offsets` to where that goes in the file."""

    sources: tuple[str, ...]
    rows: int
    cols: int
    bits: int
    block_size: int
    symmetric: bool
    float_offsets: bool
    shapes: dict[str, tuple[int, ...]]  # each part's shape, rows first
    parts: dict[str, str] = dataclasses.field(default_factory=dict)
    offsets: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def source_bytes(self) -> int:
        return self.rows * self.cols * 4


def write_quantized(
    weight: QuantizedWeight,
    checkpoint: LazyCheckpoint,
    out: DataFile,
    done: Callable[[int], None],
) -> None:
    """Quantizes block of rows by block of rows: each row's blocks depend on that row alone, so
    the pieces put together are the whole weight's quantization, byte for byte."""
    first = 0  # of the current source, among the stacked rows
    for name in weight.sources:
        rows = checkpoint.shapes[name][0]
        for start, stop in _row_blocks(rows, weight.cols * 4):
            block = _cast(checkpoint.rows(name, start, stop), torch.float32).numpy()
            q = quantize_blocks(
                block, weight.bits, weight.block_size, weight.symmetric, weight.float_offsets
            )
            for part, offset in weight.offsets.items():
                data = getattr(q, part)
                assert data.shape[1:] == weight.shapes[part][1:], (part, data.shape)
                row_bytes = data.nbytes // data.shape[0]
                out.write(offset + (first + start) * row_bytes, data)
            done((stop - start) * weight.cols * 4)
        first += rows
