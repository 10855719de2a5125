"""`--quantize` on a skeleton graph, with the weights themselves left for the writer.

`quantize_graph` (quantize/graph.py) rewrites the graph exactly as `convert --quantize` does, but
with a quantizer that, for a weight standing in for checkpoint tensors, returns stand-ins of the
shapes and dtypes `quantize_blocks` gives (learnt from one row of zeros) and records a
`QuantizedWeight` for the writer. Weights small enough to be real are quantized on the spot.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from ..quantize import BlockQuantized, quantize_blocks
from .skeleton import Recipe, address, placeholder
from .weights_file import QuantizedWeight


class StandInQuantizer:
    """Call it as `quantize_blocks`; after `quantize_graph`, `collect` names each part's
    initializer and `weights` lists what the writer quantizes."""

    def __init__(self, graph: ir.Graph, recipes: dict[str, Recipe]) -> None:
        self._stand_ins: dict[int, tuple[ir.Value, Recipe]] = {}
        for name, recipe in recipes.items():
            value = graph.initializers[name]
            self._stand_ins[address(value.const_value.raw)] = (value, recipe)  # type: ignore[union-attr]
        self._parts: dict[int, tuple[QuantizedWeight, str]] = {}
        self.weights: list[QuantizedWeight] = []

    def __call__(
        self, weight: np.ndarray, bits: int, block_size: int, symmetric: bool, offsets: bool
    ) -> BlockQuantized:
        found = self._stand_ins.get(address(weight))
        if found is None:
            return quantize_blocks(weight, bits, block_size, symmetric, offsets)
        value, recipe = found
        # The writer quantizes the sources' own rows: the view must have the orientation of
        # the checkpoint tensor the skeleton's placeholder stood for (its backing row last).
        if weight.ndim != 2 or weight.strides[0] != 0 or weight.strides[1] == 0:
            raise RuntimeError(
                f"streaming export: cannot quantize {value.name} from its checkpoint rows"
            )
        rows, cols = weight.shape
        zeros = np.zeros((1, cols), weight.dtype)
        probe = quantize_blocks(zeros, bits, block_size, symmetric, offsets)
        job = QuantizedWeight(
            recipe.sources, rows, cols, bits, block_size, symmetric, offsets, shapes={}
        )
        stand_ins: dict[str, np.ndarray] = {}
        for field in dataclasses.fields(probe):
            part = getattr(probe, field.name)
            if isinstance(part, np.ndarray):
                array = placeholder((rows, *part.shape[1:]), part.dtype)
                job.shapes[field.name] = array.shape
                self._parts[address(array)] = (job, field.name)
                stand_ins[field.name] = array
        self.weights.append(job)
        return dataclasses.replace(probe, **cast(dict[str, Any], stand_ins))

    def collect(self, graph: ir.Graph) -> dict[str, QuantizedWeight]:
        """Initializer name → the quantized weight it is a part of."""
        found: dict[str, QuantizedWeight] = {}
        for value in graph.initializers.values():
            array = getattr(value.const_value, "raw", None)
            if isinstance(array, np.ndarray) and address(array) in self._parts:
                job, part = self._parts[address(array)]
                assert value.name is not None
                job.parts[part] = value.name
                found[value.name] = job
        return found
