"""`optimize`'s proof that a fused graph computes what its input did, on generated inputs.

Both graphs run in onnxruntime on inputs of the graph's own shapes, in up to three runs:
- masks of ones and an empty cache: every output is compared;
- the same with the last row left-padded by one position: a fusion that dropped the mask, or
  read it wrongly, changes that row's real positions. Compared there: the outputs whose second
  axis is named as the sequence is (logits, hidden states), at real positions only, since the
  padded position is a fully masked query whose result each attention kernel defines its own
  way (NaN, uniform or zeros). Caches ([batch, heads, total, head_dim]) are left out of it:
  GroupQueryAttention counts a padded row's positions from its first slot, not its first real
  token, so its keys are rotated one place further than the plain graph's, which changes no
  attention score (rotary is relative) and so no logit, now or in later steps;
- for a graph with a cache, a decode step over a past of CHECK_PAST positions: the new token
  then sits past it, so a rotary cache wrong past its first rows shows even where the graph
  computes its positions from the mask. Every output is compared.
A run the input graph itself refuses (its names do not say which axes those are) is skipped.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import LmexportError, first_line
from ..runtime.session import session_options
from .pipeline import MAX_POSITIONS

CHECK_DIM = 4  # every symbolic dimension of the generated inputs, but past lengths
CHECK_PAST = 300  # the past of the cached run (a decode step: batch and sequence 1)
# Positions are drawn below this, far enough to reach a rotary cache's later rows, and below the
# rows the rotary fusion builds; below CHECK_DIM for a graph whose own table is shorter.
CHECK_POSITIONS = 4096
MIN_POSITIONS = 2 * CHECK_DIM  # the fewest rotary cache rows the check can run against


def _dims(value: onnx.ValueInfoProto) -> list[str]:
    return [d.dim_param for d in value.type.tensor_type.shape.dim]


def _generated_inputs(
    model: onnx.ModelProto, positions: int, past: int = 0
) -> dict[str, np.ndarray]:
    """Inputs a decoder-like graph accepts: ids inside the vocabulary, positions below
    `positions` (or the table a graph gathers them from), masks of ones, and past tensors of
    length `past`, so that `total = past + sequence` holds whatever the graph calls them. Over
    a past, one new token of one row (a decode step: GroupQueryAttention takes several new
    tokens over a cache for one row only)."""
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
    total_only = {d for i in inputs if "mask" in i.name for d in _dims(i) if d} - past_only
    total_only -= {d for i in inputs if "mask" not in i.name for d in _dims(i)}
    new = 1 if past else CHECK_DIM
    sizes = {**dict.fromkeys(total_only, past + new), **dict.fromkeys(past_only, past)}
    feeds = {}
    for i in inputs:
        t = i.type.tensor_type
        shape = [d.dim_value or sizes.get(d.dim_param, new) for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if "mask" in i.name:
            feeds[i.name] = np.ones(shape, dtype)
        elif not np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif "position" in i.name:
            high = min(tables.get(i.name, positions), positions)
            feeds[i.name] = rng.integers(0, high, size=shape).astype(dtype)
        else:
            feeds[i.name] = rng.integers(0, tables.get(i.name, 2), size=shape).astype(dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, feeds)


def _reference(
    model: onnx.ModelProto, positions: int
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Generated inputs and the input graph's outputs on them."""
    feeds = _generated_inputs(model, positions)
    if any("position" in name for name in feeds):
        try:
            return feeds, _run(model, feeds)
        except Exception:  # onnxruntime's own exception types are not importable stably
            # The graph may index a table shorter than `positions` by a route that
            # `_generated_inputs` does not follow.
            feeds = _generated_inputs(model, CHECK_DIM)
    try:
        return feeds, _run(model, feeds)
    except Exception as e:
        raise LmexportError(
            f"cannot run the input graph on generated inputs ({first_line(e)}); "
            "use --no-check to skip the parity check"
        ) from None


def _fused(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return _run(model, feeds)
    except Exception as e:  # a fusion onnxruntime refuses: report it, write nothing
        raise LmexportError(
            f"the optimized graph fails in onnxruntime ({first_line(e)}); nothing written"
        ) from None


def _difference(ref: np.ndarray, out: np.ndarray) -> float:
    """Largest difference relative to the scale; infinite where one side is NaN and the other
    is not (NaN would compare as no difference at all)."""
    ref = ref.astype(np.float64)
    if (np.isnan(ref) != np.isnan(out)).any():
        return float("inf")
    scale = max(1.0, float(np.nanmax(np.abs(ref), initial=0.0)))
    return float(np.nanmax(np.abs(ref - out), initial=0.0)) / scale


def _padded(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]] | None:
    """The feeds with the last row's first position padded, which positions are real, and the
    outputs laid out [batch, sequence, …] whose entries can be sorted into real and padded; None
    for a graph without one [batch, sequence] mask."""
    masks = [i for i in model.graph.input if "mask" in i.name and i.name in feeds]
    if len(masks) != 1 or feeds[masks[0].name].ndim != 2 or feeds[masks[0].name].shape[1] < 2:
        return None
    batch, total = _dims(masks[0])
    ids = [  # ids and positions
        i
        for i in model.graph.input
        if i.name in feeds and feeds[i.name].ndim == 2 and feeds[i.name].dtype.kind in "iu"
    ]
    sequence = {total} | {_dims(i)[1] for i in ids if "mask" not in i.name}
    if not batch or not all(sequence) or batch in sequence:
        return None
    outputs = [
        o.name
        for o in model.graph.output
        if _dims(o)[:1] == [batch] and len(_dims(o)) > 1 and _dims(o)[1] in sequence
    ]
    mask = feeds[masks[0].name].copy()
    mask[-1, 0] = 0
    return {**feeds, masks[0].name: mask}, mask.astype(bool), outputs


def _compare(
    before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> list[tuple[str, np.ndarray, np.ndarray]] | None:
    """Each output's name and value in both graphs; None if the input graph refuses `feeds`."""
    try:
        expected = _run(before, feeds)
    except Exception:  # onnxruntime's own exception types are not importable stably
        return None
    names = [o.name for o in before.graph.output]
    return list(zip(names, expected, _fused(after, feeds), strict=True))


def check_same(
    before: onnx.ModelProto, after: onnx.ModelProto, max_positions: int = MAX_POSITIONS
) -> float:
    """Largest output difference between the graphs, relative to the output's scale, at
    positions below `max_positions` (the rows of the fused rotary caches)."""
    positions = min(CHECK_POSITIONS, max_positions)
    feeds, expected = _reference(before, positions)
    worst = max(
        (_difference(r, o) for r, o in zip(expected, _fused(after, feeds), strict=True)),
        default=0.0,
    )
    padded = _padded(before, feeds)
    if padded is not None:
        padded_feeds, real, outputs = padded
        for name, ref, out in _compare(before, after, padded_feeds) or []:
            if name in outputs and ref.shape[:2] == real.shape:
                worst = max(worst, _difference(ref[real], out[real]))
    if any("past" in name and feeds[name].ndim > 2 for name in feeds):
        past = min(CHECK_PAST, max_positions - 1)
        cached = _generated_inputs(before, positions, past=past)
        for _, ref, out in _compare(before, after, cached) or []:
            worst = max(worst, _difference(ref, out))
    return worst
