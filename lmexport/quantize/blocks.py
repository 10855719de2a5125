"""Block-wise weight quantization in onnxruntime's `MatMulNBits` layout, one array at a time.

Numpy only and independent of any graph, so a streaming converter can quantize each weight as it
reads it. A weight is taken as rows x cols and quantized along cols, in blocks of `block_size`:
for a MatMul that is the transposed B ([N, K], blocks along K), for an embedding its own
[vocab, hidden] table. Each block keeps a scale and an integer zero point (asymmetric: the
block's min..max range, widened to hold 0, spread over 2^bits levels), and dequantizes as
(code - zero_point) · scale.

Layout (`com.microsoft::MatMulNBits`, and `GatherBlockQuantized` with uint8 data):
- codes: uint8 [rows, n_blocks, block_size · bits / 8], packed low bits first along cols (4 bits:
  element 2i in the low nibble of byte i, 2i+1 in the high nibble);
- scales: [rows, n_blocks] in the weight's float dtype;
- zero points: uint8 [rows, ceil(n_blocks · bits / 8)], packed the same way per row, or none
  (symmetric: onnxruntime then takes 2^(bits-1), 8 for int4).
A last block that runs past cols is padded with zeros, which quantize to the block's zero point.

With `offsets`, a block is stored as GGUF's Q4_1 stores it, min + scale · code, with the min a
float: the block's own range spread over 2^bits levels, and for weights that came from a Q4_1
(or Q8_1) file, their grid exactly, which no integer zero point can land on. MatMulNBits has
no float offset it runs fast (its float zero points take a slow path), so the codes go to it
symmetric (implicit zero point 2^(bits-1)) and `offsets` [rows, n_blocks] holds each block's
min + 2^(bits-1) · scale, which the graph adds as one small float MatMul on the input's block
sums (quantize/graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LmexportError

BITS = (4, 8)


@dataclass(frozen=True)
class BlockQuantized:
    codes: np.ndarray  # uint8 [rows, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float [rows, n_blocks]
    zero_points: np.ndarray | None  # uint8 [rows, ceil(n_blocks * bits / 8)]; None: symmetric
    offsets: np.ndarray | None  # float32 [rows, n_blocks], added to each block; None: none
    bits: int
    block_size: int
    cols: int

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.codes.shape[1])


def check_block_size(block_size: int) -> None:
    """onnxruntime's kernels take power-of-two blocks of at least 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise LmexportError(f"block size must be a power of 2 and at least 16, got {block_size}")


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes < 2^bits along the last axis → bytes, low bits first."""
    if bits == 8:
        return values.astype(np.uint8)
    per_byte = 8 // bits
    pad = -values.shape[-1] % per_byte
    if pad:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], -1)
    grouped = values.reshape(*values.shape[:-1], -1, per_byte).astype(np.uint8)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def quantize_blocks(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    offsets: bool = False,
) -> BlockQuantized:
    """Quantize a [rows, cols] float array along cols.

    Asymmetric: |w - dequantized| ≤ scale / 2 everywhere. Symmetric (no zero points stored;
    onnxruntime's implicit 2^(bits-1) is used): the block's largest-magnitude element m maps to
    code 0 exactly (scale = m / -2^(bits-1), so scales may be negative); the other side of zero
    has one level fewer, so elements beyond 2^(bits-1) - 1/2 steps there clip, up to |scale|
    away; everything else is within |scale| / 2. Offsets: within scale / 2, the scale spanning
    the block's own min..max; cols must be a whole number of blocks.
    """
    if bits not in BITS:
        raise LmexportError(f"bits must be one of {BITS}, got {bits}")
    check_block_size(block_size)
    if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        raise LmexportError(f"expected a 2-D float weight, got {weight.dtype}{list(weight.shape)}")
    rows, cols = weight.shape
    if offsets:
        return _quantize_with_offsets(weight, bits, block_size)
    n_blocks = -(-cols // block_size)
    w = np.zeros((rows, n_blocks * block_size), dtype=np.float32)
    w[:, :cols] = weight
    w = w.reshape(rows, n_blocks, block_size)
    levels = (1 << bits) - 1
    if symmetric:
        extreme = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)[..., 0]
        scales = (extreme / -(1 << (bits - 1))).astype(weight.dtype)
        zero = np.full(scales.shape, 1 << (bits - 1), dtype=np.float32)
    else:
        # The range always holds 0, so the zero point is a code and every element lies in it.
        low, high = np.minimum(w.min(-1), 0.0), np.maximum(w.max(-1), 0.0)
        scales = ((high - low) / levels).astype(weight.dtype)
    scale = scales.astype(np.float32)  # what the kernel multiplies by, after the dtype's rounding
    safe = np.where(scale != 0, scale, 1.0)
    if not symmetric:
        zero = np.clip(np.round(-low / safe), 0, levels)
    codes = np.clip(np.round(w / safe[..., None] + zero[..., None]), 0, levels).astype(np.uint8)
    return BlockQuantized(
        codes=_pack(codes, bits),
        scales=scales,
        zero_points=None if symmetric else _pack(zero.astype(np.uint8), bits),
        offsets=None,
        bits=bits,
        block_size=block_size,
        cols=cols,
    )


def _quantize_with_offsets(weight: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    rows, cols = weight.shape
    if cols % block_size:
        raise LmexportError(
            f"float offsets need whole blocks: {cols} columns are not a multiple of {block_size}"
        )
    w = weight.astype(np.float32).reshape(rows, cols // block_size, block_size)
    levels = (1 << bits) - 1
    low = w.min(-1)
    scales = ((w.max(-1) - low) / levels).astype(weight.dtype)
    scale = scales.astype(np.float32)
    safe = np.where(scale != 0, scale, 1.0)
    codes = np.clip(np.round((w - low[..., None]) / safe[..., None]), 0, levels).astype(np.uint8)
    return BlockQuantized(
        codes=_pack(codes, bits),
        scales=scales,
        zero_points=None,
        offsets=(low + scale * (1 << (bits - 1))).astype(np.float32),
        bits=bits,
        block_size=block_size,
        cols=cols,
    )


def dequantize_blocks(q: BlockQuantized) -> np.ndarray:
    """The float32 [rows, cols] array the quantized form stands for."""
    codes = _unpack(q.codes, q.bits, q.block_size).astype(np.float32)
    if q.zero_points is None:
        zero = np.full((q.rows, q.n_blocks), 1 << (q.bits - 1), dtype=np.float32)
    else:
        zero = _unpack(q.zero_points, q.bits, q.n_blocks).astype(np.float32)
    scale = q.scales.astype(np.float32)
    w = (codes - zero[..., None]) * scale[..., None]
    if q.offsets is not None:
        w = w + q.offsets[..., None]
    return w.reshape(q.rows, -1)[:, : q.cols]
