"""A fixed-size global filter (rfft2 → per-channel complex product → irfft2) as real matrices.

onnxruntime's DFT kernel is slow on the small feature maps of vision models. The filter is linear
with a constant weight over a fixed H x W, so it is also a few matrix products, which every runtime
runs fast. Shared by the exporter (torch) and the `optimize` pass (no torch): numpy only.

On a channels-last map x [H, W, C], with Wf = W//2 + 1 frequencies along the width:

    1. rows:    [2Wf, W] @ x            real and imaginary rfft of each row    [H, 2, Wf, C]
    2. columns: [4H, 2H] @ (H, 2) rows   complex DFT down the columns, as the
                                         blocks (Re Z, Im Z, Im Z, Re Z)         [4H, Wf, C]
    3. weight:  * [4H, Wf, C]            (Re W, Re W, -Im W, Im W): the terms of Z W
    4. columns: [2H, 4H] @ blocks        inverse DFT down the columns, blocks summed
    5. rows:    [W, 2Wf] @ ...           irfft of each row                       [H, W, C]

Separable, so far fewer multiplies than one dense 2D DFT matrix, and no transposes: every step is
a MatMul whose constant is on the left. The inverse follows irfft (the imaginary parts of the zero
and Nyquist columns are ignored), so any complex weight is reproduced exactly. Norms cancel:
irfft2(rfft2(x, ortho) * W, ortho) = irfft2(rfft2(x) * W) with numpy's default norms.
"""

from __future__ import annotations

import numpy as np


def _phase(n: int, m: int, size: int) -> np.ndarray:
    """2π k j / size over k < n, j < m, reduced mod 2π before scaling (exact for any size)."""
    k = np.arange(n)[:, None]
    j = np.arange(m)[None, :]
    return 2 * np.pi * ((k * j) % size) / size


def row_dft(width: int) -> np.ndarray:
    """[2·Wf, W]: the real, then the imaginary part of the rfft along the width."""
    theta = _phase(width // 2 + 1, width, width)
    return np.concatenate([np.cos(theta), -np.sin(theta)])


def column_dft(height: int) -> np.ndarray:
    """[4H, 2H]: from rows (h, re|im) to the blocks Re Z, Im Z, Im Z, Re Z of Z = DFT along h."""
    phi = _phase(height, height, height)
    cos, sin = np.cos(phi), np.sin(phi)
    real = np.stack([cos, sin], axis=-1).reshape(height, 2 * height)
    imag = np.stack([-sin, cos], axis=-1).reshape(height, 2 * height)
    return np.concatenate([real, imag, imag, real])


def filter_weight(spectrum: np.ndarray) -> np.ndarray:
    """[4H, Wf, C] from the complex weight [C, H, Wf]: multiplied into the blocks of
    `column_dft`, they hold Re Z·Re W, Im Z·Re W, -Im Z·Im W and Re Z·Im W."""
    w = spectrum.transpose(1, 2, 0)
    return np.concatenate([w.real, w.real, -w.imag, w.imag])


def column_idft(height: int) -> np.ndarray:
    """[2H, 4H]: the inverse DFT along h of Y = (block 0 + block 2) + i (block 1 + block 3),
    to rows (h, re|im)."""
    phi = _phase(height, height, height)
    cos, sin = np.cos(phi) / height, np.sin(phi) / height
    # Re V = Σ cos·Re Y - sin·Im Y,  Im V = Σ cos·Im Y + sin·Re Y
    real = np.concatenate([cos, -sin, cos, -sin], axis=1)
    imag = np.concatenate([sin, cos, sin, cos], axis=1)
    return np.stack([real, imag], axis=1).reshape(2 * height, 4 * height)


def row_idft(width: int) -> np.ndarray:
    """[W, 2·Wf]: irfft along the width from the real and imaginary parts."""
    freq = np.arange(width // 2 + 1)
    # irfft counts each frequency twice (itself and its mirror) but the zero and Nyquist ones.
    count = np.where((freq == 0) | (2 * freq == width), 1.0, 2.0) / width
    theta = _phase(width, width // 2 + 1, width)
    return np.concatenate([count * np.cos(theta), -count * np.sin(theta)], axis=1)


def apply(x: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
    """The filter on a channels-last batch [B, H, W, C] through the five steps (for checks)."""
    b, h, w, c = x.shape
    freq = w // 2 + 1
    rows = (row_dft(w) @ x).reshape(b, 2 * h, freq * c)
    blocks = (column_dft(h) @ rows) * filter_weight(spectrum).reshape(4 * h, freq * c)
    inverse = (column_idft(h) @ blocks).reshape(b, h, 2 * freq, c)
    return row_idft(w) @ inverse
