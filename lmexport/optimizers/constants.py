"""The constants fusion checks read: values the pipeline's cleanup folded into initializers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The array a constant value holds, else None (computed, or a graph input)."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def scalar(value: ir.Value | None) -> float | None:
    """The number a constant one-element tensor holds, else None."""
    array = const_array(value)
    return None if array is None or array.size != 1 else float(array.reshape(-1)[0])
