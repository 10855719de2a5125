"""`ort`: Attention (from `attention`) over rotated, head-split projections → GroupQueryAttention.

Matched, after the `rotary` and `attention` fusions:

    q, k, v = Transpose(Reshape(q3 | k3 | v3), perm=[0, 2, 1, 3])   projections [b, s, n·d]
    q', k'  = com.microsoft::RotaryEmbedding(q | k, positions, cos, sin)
    K, V    = Concat(past_key, k', axis=2), Concat(past_value, v, axis=2)   (or k', v: no cache)
    out     = Reshape(Transpose(Attention(q', K, V, mask), perm=[0, 2, 1, 3]))   [b, s, heads·d]

The Concats' axis may be -2 as well (transformers' cache). GroupQueryAttention takes q3/k3/v3
directly (rotary applied to them in their 3-D form), the past K/V, and returns the present K/V
that replace the Concats (the graph's `present` outputs). Left padding: its own lengths assume
right padding, so every cache slot counts as valid (seqlens_k = total - 1) and the graph's mask
becomes the additive `attention_bias`.
GroupQueryAttention is always causal, so a mask is refused unless part of it is a comparison of
two position indices (key ≤ query + past, each from a Range) or a Trilu: a comparison of anything
else (`attention_mask > 0`) is padding only. A Where keeps that part only when both of its values
hold it, or when it turns a causal condition into two constants (transformers' boolean mask made
additive, Where(allowed, 0, lowest)): Where(in_prefix, 1, causal), a prefix-LM's bidirectional
prefix, is not causal.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from .constants import const_array

COMPARISONS = {"LessOrEqual", "Less", "GreaterOrEqual", "Greater"}
# Ops whose output holds their inputs' mask values, combined (Or is left out: it can undo a causal
# part; Where, which can too, is walked on its own terms), or moved and reshaped (their other
# inputs are shapes and indices, not mask values).
COMBINING = {"And", "Not", "Add", "Mul", "Min", "Cast", "Identity"}
MOVING = {"Unsqueeze", "Reshape", "Expand", "Slice", "Squeeze", "Transpose", "Gather", "GatherND"}


def _heads(op, x3, name: str):
    return op.Transpose(
        op.Reshape(x3, _allow_other_inputs=True, _outputs=[f"{name}4_shape"]), perm=[0, 2, 1, 3]
    )


def _rotary(op, x4, name: str):
    return op.RotaryEmbedding(
        x4,
        _allow_other_inputs=True,
        _allow_other_attributes=True,
        _domain="com.microsoft",
        _outputs=[f"{name}_rot"],
    )


def _slot_positions(positions: ir.Value | None, depth: int = 10) -> bool:
    """Whether the positions are each token's cache slot up to a per-row offset: computed in
    the graph from a Range (0, 1, 2, … after the past) or a CumSum of the attention mask (left
    padding shifts a row by its pad count). Rotary is relative, so rotating at slot positions
    then gives the same scores. Positions fed as a graph input may be anything: not folded."""
    node = positions.producer() if positions is not None else None
    if node is None or depth == 0:
        return False
    if node.op_type in ("Range", "CumSum"):
        return True
    data = (
        node.inputs[0]
        if node.op_type in ("Expand", "Unsqueeze", "Slice", "Clip", "Sub", "Cast", "Reshape")
        else None
    )
    return _slot_positions(data, depth - 1)


def _is_causal(mask: ir.Value, depth: int = 12) -> bool:
    """Whether a causal part takes part in the mask's values (a bounded walk back through the
    ops that carry them, not through shape computations): a Trilu, or two different position
    indices compared."""
    node = mask.producer()
    if node is None or depth == 0 or node.domain != "":
        return False
    if node.op_type == "Trilu":
        return True
    if node.op_type in COMPARISONS:
        a, b = node.inputs[0], node.inputs[1]
        return a is not b and _is_index(a) and _is_index(b)
    if node.op_type == "Where":
        return _where_is_causal(node, depth)
    if node.op_type not in MOVING | COMBINING:
        return False
    data = node.inputs[:1] if node.op_type in MOVING else node.inputs
    return any(v is not None and _is_causal(v, depth - 1) for v in data)


def _where_is_causal(node: ir.Node, depth: int) -> bool:
    """Where(condition, x, y) keeps a causal part if both x and y hold it (whichever it picks), or
    if the condition holds it and x, y are two different constants: the Where then only encodes
    the condition's values (Where(allowed, 0, lowest)). A causal part in one value only is undone
    where the condition picks the other (a prefix-LM's Where(in_prefix, 1, causal))."""
    if len(node.inputs) != 3:
        return False
    condition, x, y = node.inputs
    if x is None or y is None:
        return False
    if _is_causal(x, depth - 1) and _is_causal(y, depth - 1):
        return True
    cx, cy = const_array(x), const_array(y)
    return (
        condition is not None
        and cx is not None
        and cy is not None
        and not np.array_equal(cx, cy)
        and _is_causal(condition, depth - 1)
    )


def _is_index(value: ir.Value | None, depth: int = 8) -> bool:
    """Whether a value holds computed positions: a Range (of the sequence), reshaped, cast, or
    offset by something else (the past length). Constants and graph inputs are not."""
    node = value.producer() if value is not None else None
    if node is None or depth == 0 or node.domain != "":
        return False
    if node.op_type == "Range":
        return True
    if node.op_type in ("Add", "Sub"):
        return any(_is_index(v, depth - 1) for v in node.inputs)
    if node.op_type in ("Unsqueeze", "Reshape", "Expand", "Slice", "Squeeze", "Cast"):
        return _is_index(node.inputs[0], depth - 1)
    return False


def _same_positions(a: ir.Value | None, b: ir.Value | None) -> bool:
    """The same positions, or the same [seq] positions expanded to each tensor's batch."""
    if a is b:
        return True
    pa, pb = (v.producer() if v is not None else None for v in (a, b))
    return (
        pa is not None
        and pb is not None
        and pa.op_type == pb.op_type == "Expand"
        and pa.inputs[0] is pb.inputs[0]
    )


class GroupQueryAttentionFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, concat_axis: int | None) -> None:
        """concat_axis: where the past joins the new keys, 2 or -2 of [b, kv_heads, s, d]
        (transformers' cache writes -2); None for a graph without a cache."""
        super().__init__(name, remove_nodes=False)  # shape computations may read the heads
        self.cache = concat_axis is not None
        self.concat_axis = concat_axis

    def pattern(self, op, q3, k3, v3, past_key, past_value, mask):
        q = _rotary(op, _heads(op, q3, "q"), "q")
        k = _rotary(op, _heads(op, k3, "k"), "k")
        v = _heads(op, v3, "v")
        if self.cache:
            k = op.Concat(past_key, k, axis=self.concat_axis)
            v = op.Concat(past_value, v, axis=self.concat_axis)
        out = op.Attention(q, k, v, mask, _allow_other_attributes=True, _outputs=["attention"])
        merged = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), _allow_other_inputs=True)
        return merged, k, v

    def check(  # type: ignore[override]  # the rewriter passes the bindings by name
        self,
        context: object,
        q3: ir.Value,
        k3: ir.Value,
        v3: ir.Value,
        mask: ir.Value,
        attention: ir.Value,
        q_rot: ir.Value,
        k_rot: ir.Value,
        **_: object,
    ) -> MatchResult:
        result = MatchResult()
        shapes = (q3.shape, k3.shape, q_rot.shape, k_rot.shape)
        if any(s is None for s in shapes):
            return result.fail("projection or head shapes unknown", q3)
        assert q_rot.shape is not None and k_rot.shape is not None
        if q_rot.shape.rank() != 4 or not isinstance(q_rot.shape[1], int):
            return result.fail(f"query heads {q_rot.shape} not [b, heads, s, d]", q_rot)
        if not isinstance(k_rot.shape[1], int) or not isinstance(q_rot.shape[3], int):
            return result.fail("head counts or head size not static", k_rot)
        q_pos, k_pos = q_rot.producer(), k_rot.producer()
        assert q_pos is not None and k_pos is not None
        same_positions = _same_positions(q_pos.inputs[1], k_pos.inputs[1])
        if not same_positions or q_pos.inputs[2:] != k_pos.inputs[2:]:
            return result.fail("Q and K are rotated with different positions or caches", k_rot)
        node = attention.producer()
        assert node is not None
        softcap: float = node.attributes.get_float("softcap", 0.0)
        if node.attributes.get_int("is_causal", 0) or softcap:
            return result.fail("Attention uses is_causal or softcap", attention)
        if mask.dtype not in (ir.DataType.BOOL, q3.dtype):
            return result.fail(f"mask dtype {mask.dtype} is neither bool nor {q3.dtype}", mask)
        width = q_rot.shape[1] * q_rot.shape[3]
        if q3.shape is None or q3.shape.rank() != 3 or q3.shape[2] != width:
            return result.fail(f"query projection {q3.shape} is not [b, s, {width}]", q3)
        if v3.shape is None or v3.shape.rank() != 3:
            return result.fail(f"value projection {v3.shape} is not [b, s, kv_heads·d]", v3)
        if not _is_causal(mask):
            return result.fail("the mask has no causal part; GroupQueryAttention is causal", mask)
        return result

    def rewrite(self, op, q3, k3, v3, mask, attention, q_rot, k_rot, **bound):
        heads, kv_heads, head_dim = q_rot.shape[1], k_rot.shape[1], q_rot.shape[3]
        rot = q_rot.producer()
        positions, cos, sin = rot.inputs[1], rot.inputs[2], rot.inputs[3]
        interleaved = rot.attributes.get_int("interleaved", 0)
        fold = head_dim % 16 == 0 and _slot_positions(positions)
        if fold:  # GroupQueryAttention rotates q and k itself, at cache-slot positions
            q, k = q3, k3
        else:
            q = op.RotaryEmbedding(
                q3,
                positions,
                cos,
                sin,
                num_heads=heads,
                interleaved=interleaved,
                _domain="com.microsoft",
            )
            k = op.RotaryEmbedding(
                k3,
                positions,
                cos,
                sin,
                num_heads=kv_heads,
                interleaved=interleaved,
                _domain="com.microsoft",
            )
        if mask.dtype == ir.DataType.BOOL:  # True = attend → additive 0 / lowest
            dtype = q3.dtype.numpy()
            zero, lowest = np.zeros((), dtype), np.array(np.finfo(dtype).min, dtype)
            mask = op.Where(
                mask, op.Constant(value=ir.tensor(zero)), op.Constant(value=ir.tensor(lowest))
            )
        # From the mask alone, so that every layer computes the same values and they merge.
        total = op.Shape(mask, start=3, end=4)  # [T]
        batch = op.Shape(mask, start=0, end=1)
        seqlens_k = op.Expand(op.Cast(op.Sub(total, op.Constant(value_ints=[1])), to=6), batch)
        total_length = op.Cast(op.Squeeze(total), to=6)
        past_key = bound.get("past_key") if self.cache else None
        past_value = bound.get("past_value") if self.cache else None
        out3, present_key, present_value = op.GroupQueryAttention(
            q, k, v3, past_key, past_value, seqlens_k, total_length,
            cos if fold else None, sin if fold else None,
            None, mask,
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(fold),
            rotary_interleaved=interleaved,
            scale=attention.producer().attributes.get_float("scale", head_dim**-0.5),
            _domain="com.microsoft", _outputs=3,
        )  # fmt: skip
        return out3, present_key, present_value


rules = pattern.RewriteRuleSet(
    [
        GroupQueryAttentionFusion.rule("GroupQueryAttention[past]", 2),
        GroupQueryAttentionFusion.rule("GroupQueryAttention[past, axis -2]", -2),
        GroupQueryAttentionFusion.rule("GroupQueryAttention", None),
    ]
)
