"""DFT-based global filters → the MatMul form of `lmexport.spectral` (HorNet GF graphs).

A global filter exported from `irfft2(rfft2(x, norm="ortho") * weight, norm="ortho")` is a stretch
of the graph from a real feature map x [N, C, H, W] (unsqueezed into the exporter's complex layout,
a trailing axis of 2) through forward DFTs, a product with a constant complex weight and inverse
DFTs, back to a real tensor of x's shape. onnxruntime's DFT kernel makes it the slowest part of
the model.

How the exporter spells the middle (the complex product, slices of the weight, a resize of it,
norm scalings) varies, so the region is not matched op by op. It is found by following the data
from x until it is real again, and accepted only when it is closed (only x and constants flow in,
nothing outside reads inside it) and its numbers prove it a per-channel circular convolution: its
response to a unit impulse is the kernel, and its output on a random input is that kernel's
circular convolution of the input. The kernel's spectrum then gives the MatMul form, computed
channels-last between two Transposes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx.utils import Extractor

from .. import spectral
from ..errors import first_line
from ..runtime.session import session_options
from .report import Fusion

TOLERANCE = 1e-4  # of the probe output against the circular convolution, relative to its scale
# Ops by which exporters scale a real input before DFT (norm="ortho" divides by √n).
SCALINGS = ("Div", "Mul")


@dataclass
class Region:
    x: ir.Value  # the real input [N, C, H, W]
    y: ir.Value  # the real output, x's shape
    nodes: list[ir.Node]


def lower_global_filters(model: ir.Model) -> Fusion:
    """Replace every accepted global filter of `model`'s main graph; the report lists refusals.

    The replaced DFT nodes are left unused, for the pipeline's clean-up to remove.
    """
    graph = model.graph
    candidates: list[Region] = []
    refused: list[str] = []
    claimed: set[ir.Node] = set()
    for node in graph:
        if node in claimed or not _is_dft(node) or _inverse(node):
            continue
        found = _region(node)
        if isinstance(found, str):
            refused.append(f"{node.name or node.op_type}: {found}")
            continue
        claimed.update(found.nodes)
        candidates.append(found)
    if not candidates:
        return Fusion("global_filter", 0, refused)
    ir.passes.common.NameFixPass()(model)
    extractor = Extractor(ir.serde.serialize_model(model))
    applied = 0
    for region in candidates:
        kernel = _kernel(extractor, region)
        if isinstance(kernel, str):
            refused.append(f"{region.y.name}: {kernel}")
            continue
        _replace(graph, region, kernel)
        applied += 1
    return Fusion("global_filter", applied, refused)


def _is_dft(node: ir.Node) -> bool:
    return node.op_type == "DFT" and node.domain in ("", "ai.onnx")


def _inverse(node: ir.Node) -> bool:
    return bool(node.attributes.get_int("inverse"))


def _constant(value: ir.Value, memo: dict[ir.Value, bool]) -> bool:
    """Whether `value` is known before the graph runs: an initializer, or computed from them."""
    if value not in memo:
        producer = value.producer()
        if value.const_value is not None or value.is_initializer():
            memo[value] = not value.is_graph_input()
        elif producer is None:
            memo[value] = False
        else:
            memo[value] = all(_constant(i, memo) for i in producer.inputs if i is not None)
    return memo[value]


def _real_input(dft: ir.Node, memo: dict[ir.Value, bool]) -> tuple[ir.Value, ir.Node] | str:
    """x and the Unsqueeze that gives it the complex axis, above the first forward DFT."""
    value = dft.inputs[0]
    while value is not None and len(value.uses()) == 1:
        producer = value.producer()
        if producer is None:
            break
        if producer.op_type == "Unsqueeze" and producer.inputs[0] is not None:
            return producer.inputs[0], producer
        if producer.op_type not in SCALINGS:
            break
        value = _data_input(producer, memo)
        if producer.op_type == "Div" and value is not producer.inputs[0]:
            break  # dividing a constant by the signal is not a scaling
    return "the DFT's input is not a real tensor given a complex axis by Unsqueeze"


def _data_input(node: ir.Node, memo: dict[ir.Value, bool]) -> ir.Value | None:
    """The one input of a Mul that is not a constant."""
    data = [i for i in node.inputs if i is not None and not _constant(i, memo)]
    return data[0] if len(data) == 1 else None


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    return a is not None and b is not None and a.rank() == b.rank() and list(a) == list(b)


def _region(dft: ir.Node) -> Region | str:
    """The closed stretch of graph from the real input of `dft` until the signal is real again."""
    memo: dict[ir.Value, bool] = {}
    found = _real_input(dft, memo)
    if isinstance(found, str):
        return found
    x, start = found
    shape = x.shape
    if shape is None or shape.rank() != 4 or not all(isinstance(d, int) for d in list(shape)[1:]):
        return f"input {x.name} is not [batch, channels, height, width] with fixed sizes: {shape}"
    nodes = [start]
    inside = set(start.outputs)
    ends: set[ir.Value] = set()
    grown = True
    while grown:
        grown = False
        for value in list(inside - ends):
            if value not in start.outputs and _same_shape(value.shape, shape):
                ends.add(value)  # real again: the filter's output
                continue
            for consumer in value.consumers():
                ready = all(
                    i in inside or _constant(i, memo) for i in consumer.inputs if i is not None
                )
                if consumer not in nodes and ready:
                    nodes.append(consumer)
                    inside.update(consumer.outputs)
                    grown = True
    if len(ends) != 1:
        return f"{len(ends)} outputs of x's shape {list(shape)} after the DFTs, not one"
    (y,) = ends
    if not any(_is_dft(n) and _inverse(n) for n in nodes):
        return f"no inverse DFT between {x.name} and {y.name}"
    for value in inside - ends:
        if value.is_graph_output() or any(c not in nodes for c in value.consumers()):
            return f"{value.name}, inside the filter, is also read outside it"
    return Region(x, y, nodes)


def _kernel(extractor: Extractor, region: Region) -> np.ndarray | str:
    """The per-channel kernel [C, H, W] of the region, or why it is not a circular convolution."""
    assert region.x.name is not None and region.y.name is not None
    try:
        sub = extractor.extract_model([region.x.name], [region.y.name])
        session = ort.InferenceSession(
            sub.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnx and onnxruntime raise their own untyped errors
        return f"cannot evaluate the region ({first_line(e, 120)})"
    assert region.x.shape is not None
    batch, channels, height, width = (d if isinstance(d, int) else 1 for d in list(region.x.shape))
    impulse = np.zeros((batch, channels, height, width), np.float32)
    impulse[:, :, 0, 0] = 1.0
    probe = np.random.default_rng(0).standard_normal(impulse.shape).astype(np.float32)
    kernel, got = (session.run(None, {region.x.name: p})[0][0] for p in (impulse, probe))
    expected = np.fft.irfft2(np.fft.rfft2(probe[0]) * np.fft.rfft2(kernel), s=(height, width))
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = float(np.abs(expected - got).max()) / scale
    if not np.isfinite(error) or error > TOLERANCE:
        return f"not a per-channel circular convolution (probe differs by {error:.3g})"
    return kernel


def _replace(graph: ir.Graph, region: Region, kernel: np.ndarray) -> None:
    """Compute the filter of `kernel` on x with MatMuls and let region.y's readers use it."""
    channels, height, width = kernel.shape
    freq = width // 2 + 1
    spectrum = np.fft.rfft2(kernel.astype(np.float64))
    tape = ir.tape.Tape()
    prefix = f"{region.y.name}_gf"

    def const(name: str, array: np.ndarray) -> ir.Value:
        data = array.astype(np.int64 if array.dtype.kind == "i" else np.float32)
        value = tape.initializer(ir.tensor(data), name=f"{prefix}_{name}")
        graph.register_initializer(value)
        return value

    x = tape.op("Transpose", [region.x], {"perm": [0, 2, 3, 1]})
    rows = tape.op("MatMul", [const("row_dft", spectral.row_dft(width)), x])
    rows = tape.op(
        "Reshape", [rows, const("rows_shape", np.array([-1, 2 * height, freq * channels]))]
    )
    blocks = tape.op("MatMul", [const("column_dft", spectral.column_dft(height)), rows])
    weight = spectral.filter_weight(spectrum).reshape(4 * height, freq * channels)
    blocks = tape.op("Mul", [blocks, const("weight", weight)])
    inverse = tape.op("MatMul", [const("column_idft", spectral.column_idft(height)), blocks])
    inverse = tape.op(
        "Reshape", [inverse, const("inverse_shape", np.array([-1, height, 2 * freq, channels]))]
    )
    out = tape.op("MatMul", [const("row_idft", spectral.row_idft(width)), inverse])
    out = tape.op("Transpose", [out], {"perm": [0, 3, 1, 2]})
    out.name, out.shape, out.type = f"{prefix}_out", region.y.shape, region.y.type
    graph.insert_after(region.y.producer(), tape.nodes)  # type: ignore[arg-type]
    ir.convenience.replace_all_uses_with(region.y, out, replace_graph_outputs=True)
