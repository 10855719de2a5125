"""Rotate-half rotary embedding → one RotaryEmbedding op with a precomputed cos/sin cache.

Matched (Add and Mul in either order), on x of shape [batch, heads, sequence, head_dim]:

    x1, x2 = Split(x, 2, last axis) | Slice(x, :d/2), Slice(x, d/2:)
    out = x * cos + Concat(-x2, x1) * sin

where cos/sin are Unsqueeze(Cos(E)) / Unsqueeze(Sin(E)) of the same angles E, and E is either
Concat(F, F) with F = float(positions) · inv_freq (a constant), or a Gather of constant cos/sin
tables by positions. `check()` traces cos and sin back to the positions and the frequencies, and
refuses cos/sin laid out for x as [batch, sequence, heads, head_dim] (unsqueezed at axis 2);
`rewrite()` emits `RotaryEmbedding` (opset 23 for `onnx`, `com.microsoft` for `ort`) with a cache
of `max_positions` rows computed exactly as the graph did (float32 angles), positions expanded to
[batch, sequence] and clamped at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from .constants import const_array

HALVES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class Angles:
    """Where a rotary's cos/sin come from: integer positions and a constant cos/sin cache."""

    positions: ir.Value
    cos_cache: np.ndarray  # [max_positions, head_dim / 2], float32
    sin_cache: np.ndarray


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _strip_unsqueeze(value: ir.Value) -> ir.Value:
    node = _producer(value, "Unsqueeze")
    return node.inputs[0] if node is not None and node.inputs[0] is not None else value


def _rounded_from(value: ir.Value, dtype: ir.DataType | None) -> ir.Value | None:
    """The float32 cos/sin that a Cast rounds to `dtype`, a float16/bfloat16 model's (the cache is
    rounded the same way in `rewrite`); None for any other Cast or op."""
    node = _producer(value, "Cast")
    if node is None or dtype not in HALVES or node.attributes.get_int("to", 0) != dtype.value:
        return None
    source = node.inputs[0]
    return source if source is not None and source.dtype == ir.DataType.FLOAT else None


def _cos_sin_source(value: ir.Value) -> ir.Value:
    """Cos(angles) or a gathered table behind cos/sin: an Unsqueeze, and one Cast from float32 to
    the model's float16/bfloat16, in either order."""
    rounded = _rounded_from(value, value.dtype)
    inner = _strip_unsqueeze(rounded or value)
    return inner if rounded is not None else (_rounded_from(inner, value.dtype) or inner)


def trace_angles(
    cos: ir.Value, sin: ir.Value, head_dim: int, max_positions: int, interleaved: bool = False
) -> Angles | str:
    """The positions and cache behind a rotary's cos/sin, or the reason they cannot be used.

    Rotate-half forms use angles Concat(F, F) over the whole head; interleaved forms use F, one
    angle per pair of channels."""
    cos_node = _producer(_cos_sin_source(cos), "Cos")
    sin_node = _producer(_cos_sin_source(sin), "Sin")
    if cos_node is None or sin_node is None:
        if interleaved:
            return "cos/sin of the interleaved form are not Cos/Sin of angles"
        return _trace_tables(cos, sin, head_dim)
    angles = cos_node.inputs[0]
    if angles is not sin_node.inputs[0]:
        return "cos and sin are computed from different angles"
    if angles is not None and angles.dtype not in (ir.DataType.FLOAT, None):
        # Rounded angles are off by up to a radian at position 3000, by an amount that depends on
        # where onnxruntime computes in float32 (its graph optimization level changes it): no
        # cache reproduces them.
        return f"angles are {angles.dtype}, not float32: their rounding cannot be reproduced"
    freqs = angles
    if not interleaved:
        concat = _producer(angles, "Concat")
        if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
            return "angles are not Concat(freqs, freqs) (duplicated halves, rotate-half form)"
        freqs = concat.inputs[0]
    mul = _producer(freqs, "Mul")
    if mul is None:
        return "frequencies are not positions · inv_freq"
    inv_freq = next((c for c in map(const_array, mul.inputs) if c is not None), None)
    other = next((v for v in mul.inputs if const_array(v) is None), None)
    if inv_freq is None or other is None:
        return "inv_freq is not a constant"
    inv_freq = inv_freq.astype(np.float32).reshape(-1)
    if inv_freq.size * 2 != head_dim:
        return f"inv_freq has {inv_freq.size} entries, head_dim {head_dim} needs {head_dim // 2}"
    cast = _producer(_strip_unsqueeze(other), "Cast")  # Cast(Unsqueeze(p)) or Unsqueeze(Cast(p))
    source = cast.inputs[0] if cast is not None else None
    positions = _strip_unsqueeze(source) if source is not None else None
    if positions is None or positions.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return "positions are not an integer tensor cast to float"
    table = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return Angles(positions, np.cos(table), np.sin(table))


def _gathered(value: ir.Value) -> tuple[ir.Value | None, ir.Value | None]:
    """(table, positions) of table[positions]: Gather on axis 0, or GatherND by positions[..., None]
    (how torch exports indexing)."""
    node = _producer(value, "Gather")
    if node is not None and node.attributes.get_int("axis", 0) == 0:
        return node.inputs[0], node.inputs[1]
    node = _producer(value, "GatherND")
    if node is not None and node.attributes.get_int("batch_dims", 0) == 0:
        indices = _producer(node.inputs[1], "Unsqueeze")
        if indices is not None and _int_list(indices.inputs[1]) in ([-1], [2]):
            return node.inputs[0], indices.inputs[0]
    return None, None


def _trace_tables(cos: ir.Value, sin: ir.Value, head_dim: int) -> Angles | str:
    """cos/sin gathered from constant [max_positions, head_dim] tables by positions."""
    cos_source, positions = _gathered(_cos_sin_source(cos))
    sin_source, sin_positions = _gathered(_cos_sin_source(sin))
    if positions is None or sin_positions is None:
        return "cos/sin are neither Cos/Sin of angles nor gathered from constant tables"
    cos_table, sin_table = const_array(cos_source), const_array(sin_source)
    if cos_table is None or sin_table is None or positions is not sin_positions:
        return "cos/sin tables are not constants gathered by the same positions"
    if cos_table.ndim != 2 or cos_table.shape[1] != head_dim or sin_table.shape != cos_table.shape:
        return f"cos/sin tables of shape {list(cos_table.shape)} do not fit head_dim {head_dim}"
    half = head_dim // 2
    if not (
        np.array_equal(cos_table[:, :half], cos_table[:, half:])
        and np.array_equal(sin_table[:, :half], sin_table[:, half:])
    ):
        return "cos/sin tables do not repeat their halves (not the rotate-half form)"
    assert positions is not None
    return Angles(positions, cos_table[:, :half].astype(np.float32), sin_table[:, :half])


class RotaryFusion(pattern.RewriteRuleClassBase):
    """`halves`: "split" or "slice" (rotate-half forms), or "interleaved" (pairs of channels:
    x1, x2 = x[..., ::2], x[..., 1::2]; out = interleave(x1·cos - x2·sin, x1·sin + x2·cos))."""

    def __init__(self, name: str, target: str, max_positions: int, halves: str) -> None:
        super().__init__(name)
        self.target = target
        self.max_positions = max_positions
        self.halves = halves
        self.interleaved = halves == "interleaved"
        # One cache initializer per distinct set of frequencies, shared by every layer.
        self._caches: dict[bytes, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, cos, sin):
        if self.halves == "interleaved":
            x1 = op.Slice(x, _allow_other_inputs=True, _outputs=["x1"])
            x2 = op.Slice(x, _allow_other_inputs=True, _outputs=["x2"])
            real = op.Sub(op.Mul(x1, cos), op.Mul(x2, sin))
            imag = op.Add(op.Mul(x1, sin), op.Mul(x2, cos))
            pairs = op.Concat(  # [..., d/2, 2] → [..., d] pairs (checked: unsqueezed at -1)
                op.Unsqueeze(real, _allow_other_inputs=True, _outputs=["real_pairs"]),
                op.Unsqueeze(imag, _allow_other_inputs=True, _outputs=["imag_pairs"]),
                axis=-1,
            )
            return op.Reshape(pairs, _allow_other_inputs=True, _outputs=["rotated"])
        if self.halves == "split":
            x1, x2 = op.Split(x, _allow_other_inputs=True, _outputs=2)
        else:
            x1 = op.Slice(x, _allow_other_inputs=True, _outputs=["x1"])
            x2 = op.Slice(x, _allow_other_inputs=True, _outputs=["x2"])
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(  # type: ignore[override]  # the rewriter passes the bindings by name
        self, context: object, x: ir.Value, cos: ir.Value, sin: ir.Value, **bound: ir.Value
    ) -> MatchResult:
        result = MatchResult()
        if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
            return result.fail(f"x shape {x.shape} is not [batch, heads, sequence, head_dim]", x)
        head_dim = x.shape[3]
        if x.dtype not in (ir.DataType.FLOAT, *HALVES):
            return result.fail(f"x is {x.dtype}, not float32, float16 or bfloat16", x)
        if self.halves == "interleaved":
            if not _slices_pairs(bound["x1"], bound["x2"]):
                return result.fail("the two Slices are not the even and odd channels")
            for part in ("real", "imag"):
                unsqueezed = bound[f"{part}_pairs"]
                if not _unsqueezed_last(unsqueezed):
                    # At -2, the Concat on the last axis writes [real..., imag...]: halves.
                    return result.fail(
                        f"the {part} parts are not unsqueezed at the last axis (not paired)",
                        unsqueezed,
                    )
            rotated = bound["rotated"]
            if rotated.shape is None or list(rotated.shape) != list(x.shape):
                return result.fail(f"interleaved result {rotated.shape} is not x's {x.shape}")
        if self.halves == "slice" and not _slices_halves(bound["x1"], bound["x2"], head_dim):
            return result.fail("the two Slices are not the first and second half of head_dim")
        if self.halves == "split" and not _splits_halves(x, head_dim):
            return result.fail("the Split is not into two equal halves of the last axis")
        angles = trace_angles(cos, sin, head_dim, self.max_positions, self.interleaved)
        if isinstance(angles, str):
            return result.fail(angles, cos)
        if angles.positions.shape is None or angles.positions.shape.rank() not in (1, 2):
            return result.fail(f"positions shape {angles.positions.shape} is not [seq] or [b, seq]")
        if angles.cos_cache.shape[0] < 2:
            return result.fail("cos/sin cache has fewer than 2 positions")
        if not (_heads_layout(cos, angles.positions) and _heads_layout(sin, angles.positions)):
            return result.fail("cos/sin do not broadcast as [batch, 1, seq, d] (x's heads axis 1)")
        return result

    def rewrite(self, op, x, cos, sin, **_):
        angles = trace_angles(cos, sin, x.shape[3], self.max_positions, self.interleaved)
        assert not isinstance(angles, str)
        dtype = x.dtype.numpy()
        key = angles.cos_cache.astype(dtype).tobytes() + angles.sin_cache.astype(dtype).tobytes()
        if key not in self._caches:
            n = len(self._caches)
            self._caches[key] = (
                op.initializer(ir.tensor(angles.cos_cache.astype(dtype)), name=f"rotary_cos_{n}"),
                op.initializer(ir.tensor(angles.sin_cache.astype(dtype)), name=f"rotary_sin_{n}"),
            )
        cos_cache, sin_cache = self._caches[key]
        positions = angles.positions
        if positions.dtype != ir.DataType.INT64:
            positions = op.Cast(positions, to=ir.DataType.INT64.value)
        # cumsum(mask) - 1 gives left padding -1, outside RotaryEmbedding's cache, where the graph
        # rotated by it: those rows are masked out anyway, so they rotate by 0 instead.
        positions = op.Clip(positions, op.Constant(value=ir.tensor(np.array(0, np.int64))))
        rank = angles.positions.shape.rank()  # type: ignore[union-attr]  # checked: 1 or 2
        if rank == 1 or not _same_dim(angles.positions.shape[0], x.shape[0]):  # type: ignore[index]
            # [seq], or [1, seq] broadcast over the batch → [batch, seq] as RotaryEmbedding reads.
            if rank == 1:
                positions = op.Unsqueeze(positions, op.Constant(value_ints=[0]))
            shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(positions, start=1), axis=0)
            positions = op.Expand(positions, shape)
        if self.target == "onnx":
            return op.RotaryEmbedding(
                x, cos_cache, sin_cache, positions, interleaved=int(self.interleaved)
            )
        return op.RotaryEmbedding(
            x,
            positions,
            cos_cache,
            sin_cache,
            interleaved=int(self.interleaved),
            _domain="com.microsoft",
        )


def _heads_layout(cos: ir.Value, positions: ir.Value) -> bool:
    """Whether cos (or sin) broadcasts against x as [batch, heads, sequence, head_dim], the layout
    RotaryEmbedding reads: angles [seq, d] may gain leading axes, angles [batch, seq, d] gain the
    heads axis 1. [batch, seq, heads, d] layouts unsqueeze at axis 2 (or [seq, 1, d]): a fused op
    would rotate each head by another position, or fail."""
    node = _producer(_rounded_from(cos, cos.dtype) or cos, "Unsqueeze")
    source = node.inputs[0] if node is not None else cos
    if source is None:
        return False
    shape = source.shape or positions.shape  # angles: the positions' shape and d
    if shape is None:
        return False
    rank = shape.rank() + (source.shape is None)
    axes = _int_list(node.inputs[1]) if node is not None and len(node.inputs) > 1 else []
    if axes is None:
        return False
    out = rank + len(axes)
    axes = sorted(a % out for a in axes)
    if rank == 2:
        return out <= 4 and all(a < out - 2 for a in axes)
    return rank == 3 and axes == [1]


def _same_dim(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    """Known to be the same size (two unknown dimensions are not)."""
    return a == b and (isinstance(a, int) or a.value is not None)


def _int_list(value: ir.Value | None) -> list[int] | None:
    array = const_array(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _slices_halves(x1: ir.Value, x2: ir.Value, head_dim: int) -> bool:
    def bounds(value: ir.Value) -> tuple[int, int] | None:
        node = value.producer()
        if node is None:
            return None
        inputs = [*node.inputs, None, None][:5]
        starts, ends, axes, steps = (_int_list(v) for v in inputs[1:5])
        if starts is None or ends is None or len(starts) != 1:
            return None
        if (axes or [-1])[0] not in (-1, 3) or (steps or [1])[0] != 1:
            return None
        return starts[0], min(ends[0], head_dim)

    half = head_dim // 2
    return bounds(x1) == (0, half) and bounds(x2) == (half, head_dim)


def _slices_pairs(x1: ir.Value, x2: ir.Value) -> bool:
    """x[..., 0::2] and x[..., 1::2]."""

    def start_step(value: ir.Value) -> tuple[int, int] | None:
        node = value.producer()
        if node is None:
            return None
        inputs = [*node.inputs, None, None][:5]
        starts, _, axes, steps = (_int_list(v) for v in inputs[1:5])
        if starts is None or steps is None or len(starts) != 1 or (axes or [-1])[0] not in (-1, 3):
            return None
        return starts[0], steps[0]

    return start_step(x1) == (0, 2) and start_step(x2) == (1, 2)


def _unsqueezed_last(value: ir.Value) -> bool:
    """Unsqueeze(part, [-1]) (or the rank's last axis): the Concat on the last axis that follows
    then pairs real and imaginary parts channel by channel, [..., d/2, 2], as the interleaved
    form reads them."""
    node = value.producer()
    if node is None:
        return False
    if len(node.inputs) > 1:
        axes = _int_list(node.inputs[1])
    else:  # opset < 13: an attribute
        axes = list(node.attributes.get_ints("axes", [])) or None
    if axes is None or len(axes) != 1:
        return False
    source = node.inputs[0]
    if value.shape is not None:
        rank: int | None = value.shape.rank()
    elif source is not None and source.shape is not None:
        rank = source.shape.rank() + 1
    else:
        rank = None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _splits_halves(x: ir.Value, head_dim: int) -> bool:
    node = next(
        (u for u, _ in x.uses() if u.op_type == "Split" and u.domain == ""),
        None,
    )
    if node is None or node.attributes.get_int("axis", 0) not in (-1, 3):
        return False
    sizes = _int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    return sizes is None or sizes == [head_dim // 2, head_dim // 2]


def make_rules(target: str, max_positions: int) -> pattern.RewriteRuleSet:
    """Fresh rules for one model: they keep the cache initializers they created."""
    return pattern.RewriteRuleSet(
        [
            RotaryFusion.rule("RotaryEmbedding", target, max_positions, halves)
            for halves in ("split", "slice", "interleaved")
        ],
        commute=True,
    )
