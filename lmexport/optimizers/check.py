"""`optimize`'s proof that a fused graph computes what its input did, on generated inputs.

Both graphs run in onnxruntime on inputs of the graph's own shapes, twice. First with masks of
ones: every output is compared. Then with the last row left-padded by one position: a fusion
that dropped the mask, or read it wrongly, changes that row's real positions. That run compares
the outputs (logits, hidden states) at real positions only, where their batch and sequence axes
are named as the mask's are, so that padded entries can be told apart: the padded position is
a fully masked query, whose result each attention kernel defines its own way (NaN, uniform or
zeros). The caches (`present.*`) are left out of it, as GroupQueryAttention counts a padded
row's positions from its first slot, not its first real token: its keys are rotated one place
further than the plain graph's, which changes no attention score (rotary is relative) and so no
logit, now or in later steps.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import LmexportError
from ..runtime.session import QUIET

CHECK_DIM = 4  # every symbolic dimension of the generated inputs, but past lengths (0)
# Positions are drawn below this, far enough to reach a rotary cache's later rows and inside
# the 8192 rows the rotary fusion builds; below CHECK_DIM for a graph whose own table is shorter.
CHECK_POSITIONS = 4096


def _dims(value: onnx.ValueInfoProto) -> list[str]:
    return [d.dim_param for d in value.type.tensor_type.shape.dim]


def _generated_inputs(model: onnx.ModelProto, positions: int) -> dict[str, np.ndarray]:
    """Inputs a decoder-like graph accepts: ids inside the vocabulary, positions below
    `positions` (or the table a graph gathers them from), masks of ones, and past tensors of
    length 0 so that `total = past + sequence` holds whatever the graph calls them."""
    rng = np.random.default_rng(0)
    initializers = {t.name: t for t in model.graph.initializer}
    tables = {
        n.input[1]: initializers[n.input[0]].dims[0]
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in initializers
    }
    inputs = [i for i in model.graph.input if i.name not in initializers]
    past_only = {d for i in inputs if "past" in i.name for d in _dims(i) if d}
    past_only -= {d for i in inputs if "past" not in i.name for d in _dims(i)}
    feeds = {}
    for i in inputs:
        t = i.type.tensor_type
        shape = [
            d.dim_value if d.dim_value else (0 if d.dim_param in past_only else CHECK_DIM)
            for d in t.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if not np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in i.name:
            feeds[i.name] = np.ones(shape, dtype)
        elif "position" in i.name:
            high = min(tables.get(i.name, positions), positions)
            feeds[i.name] = rng.integers(0, high, size=shape).astype(dtype)
        else:
            feeds[i.name] = rng.integers(0, tables.get(i.name, 2), size=shape).astype(dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, feeds)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _reference(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Generated inputs and the input graph's outputs on them."""
    feeds = _generated_inputs(model, CHECK_POSITIONS)
    if any("position" in name for name in feeds):
        try:
            return feeds, _run(model, feeds)
        except Exception:  # onnxruntime's own exception types are not importable stably
            # The graph may index a table shorter than CHECK_POSITIONS by a route that
            # `_generated_inputs` does not follow.
            feeds = _generated_inputs(model, CHECK_DIM)
    try:
        return feeds, _run(model, feeds)
    except Exception as e:
        raise LmexportError(
            f"cannot run the input graph on generated inputs ({_first_line(e)}); "
            "use --no-check to skip the parity check"
        ) from None


def _fused(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return _run(model, feeds)
    except Exception as e:  # a fusion onnxruntime refuses: report it, write nothing
        raise LmexportError(
            f"the optimized graph fails in onnxruntime ({_first_line(e)}); nothing written"
        ) from None


def _difference(ref: np.ndarray, out: np.ndarray) -> float:
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    return float(np.abs(ref.astype(np.float64) - out).max(initial=0.0)) / scale


def _padded(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]] | None:
    """The feeds with the last row's first position padded, which positions are real, and the
    sequence axis of each output whose entries can be sorted into real and padded; None for a
    graph without a [batch, sequence] mask over the whole sequence (a cache of length 0)."""
    tokens = [  # ids and positions
        i
        for i in model.graph.input
        if i.name in feeds and feeds[i.name].ndim == 2 and feeds[i.name].dtype.kind in "iu"
    ]
    masks = [i for i in tokens if "mask" in i.name]
    if len(masks) != 1 or feeds[masks[0].name].shape[1] < 2:
        return None
    batch, total = _dims(masks[0])
    sequence = {total} | {_dims(i)[1] for i in tokens}
    if not batch or not all(sequence) or len(sequence | {batch}) < 2:
        return None
    axes = {}
    for o in model.graph.output:
        dims = _dims(o)
        named = [a for a, d in enumerate(dims) if a > 0 and d in sequence]
        if dims and dims[0] == batch and len(named) == 1 and "present" not in o.name:
            axes[o.name] = named[0]
    mask = feeds[masks[0].name].copy()
    mask[-1, 0] = 0
    return {**feeds, masks[0].name: mask}, mask.astype(bool), axes


def check_same(before: onnx.ModelProto, after: onnx.ModelProto) -> float:
    """Largest output difference between the graphs, relative to the output's scale."""
    feeds, expected = _reference(before)
    worst = max(
        (_difference(r, o) for r, o in zip(expected, _fused(after, feeds), strict=True)),
        default=0.0,
    )
    padded = _padded(before, feeds)
    if padded is None:
        return worst
    feeds, real, axes = padded
    names = [o.name for o in before.graph.output]
    try:
        expected = _run(before, feeds)
    except Exception:  # a graph that takes no padding: nothing to compare there
        return worst
    for name, ref, out in zip(names, expected, _fused(after, feeds), strict=True):
        if (
            name in axes
            and ref.shape[0] == real.shape[0]
            and ref.shape[axes[name]] == real.shape[1]
        ):
            ref, out = np.moveaxis(ref, axes[name], 1)[real], np.moveaxis(out, axes[name], 1)[real]
            worst = max(worst, _difference(ref, out))
    return worst
