"""Grouped scaled-dot-product attention → one ONNX opset 23 `Attention` op.

Matched on 4-D tensors [batch, heads, sequence, head_dim] (Add and Mul in either order):

    K', V' = K, V repeated per query group: Reshape(Expand(Unsqueeze(K, 2))) (repeat_kv), or
             Tile(K, [1, groups, 1, 1]) (the query heads are then reordered around Attention
             by two Gathers, since Tile pairs query head h with kv head h % kv_heads), or K (MHA)
    scores = MatMul(Q, Transpose(K')) · scale          (eager exports)
           | MatMul(Q, Transpose(K')) / c                 (scale 1/c, as `/ math.sqrt(d)` exports)
           | MatMul(Q · a, Reshape(Transpose(Reshape(K'))) · b)   (decomposed SDPA, scale a·b)
    masked = Where(masked_out, very negative, scores) | scores + additive bias
    probs  = Softmax(masked, last axis), optionally with SDPA's NaN guard, or in float32 between
             two Casts (float16/bfloat16 eager attention: Attention's softmax_precision)
    out    = MatMul(probs, V')

`Attention(Q, K, V, mask, scale)` takes the K/V of the kv heads directly, so the repeat (Expand,
Reshape) disappears with the match. Past K/V concatenation stays in front of it: its outputs are
the graph's `present` tensors. The mask is passed as the graph built it, boolean (True = attend)
or additive.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from .constants import scalar

VERY_NEGATIVE = -1e4  # a masked-out score at or below this is a mask, not a value


def _repeated(op, kv, name: str):
    """K or V repeated to the query heads: "interleave" as transformers' repeat_kv does (query
    head h reads kv head h // groups), "tile" as Tensor.repeat does (h reads h % kv_heads), or
    not at all ("none", MHA)."""
    expanded = op.Expand(
        op.Unsqueeze(kv, _allow_other_inputs=True, _outputs=[f"{name}_unsq"]),
        _allow_other_inputs=True,
    )
    interleaved = op.Reshape(expanded, _allow_other_inputs=True)
    tiled = op.Tile(kv, _allow_other_inputs=True, _outputs=[f"{name}_tiled"])
    return pattern.OrValue(
        [interleaved, tiled, kv],
        tag_var=f"{name}_repeat",
        tag_values=["interleave", "tile", "none"],
    )


def _tile_order(heads: int, kv_heads: int) -> list[int]:
    """Query heads reordered so that Attention's grouping (position i reads kv head
    i // groups) pairs each with the kv head Tile gave it (head h reads h % kv_heads)."""
    groups = heads // kv_heads
    return [(i % groups) * kv_heads + i // groups for i in range(heads)]


class AttentionFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, scores: str, masking: str, nan_guard: bool, upcast: bool) -> None:
        # Decomposed SDPA reads K's shape for its reshapes: the matched nodes are left for the
        # cleanup that follows to remove once nothing uses them.
        super().__init__(name, remove_nodes=False)
        self.scores, self.masking, self.nan_guard = scores, masking, nan_guard
        self.upcast = upcast

    def pattern(self, op, q, k, v, scale, mask, fill, guard_fill, q_scale, k_scale):
        k_rep = _repeated(op, k, "k")
        v_rep = _repeated(op, v, "v")
        if self.scores in ("eager", "div"):
            raw = op.MatMul(q, op.Transpose(k_rep, perm=[0, 1, 3, 2]))
            scores = op.Mul(raw, scale) if self.scores == "eager" else op.Div(raw, scale)
        else:
            flat = op.Reshape(k_rep, _allow_other_inputs=True)
            k_t = op.Reshape(op.Transpose(flat, perm=[0, 2, 1]), _allow_other_inputs=True)
            scores = op.MatMul(op.Mul(q, q_scale), op.Mul(k_t, k_scale))
        masked = op.Where(mask, fill, scores) if self.masking == "where" else op.Add(scores, mask)
        if self.upcast:
            probs = op.Cast(
                op.Softmax(op.Cast(masked, _outputs=["upcast"]), _outputs=["probs"]),
                _outputs=["downcast"],
            )
        else:
            probs = op.Softmax(masked, _outputs=["probs"])
        if self.nan_guard:
            # Its own fill (0), not the mask's: one variable would ask for one value for both.
            probs = op.Where(op.IsNaN(probs), guard_fill, probs)
        return op.MatMul(probs, v_rep)

    def check(  # type: ignore[override]  # the rewriter passes the bindings by name
        self,
        context: object,
        q: ir.Value,
        k: ir.Value,
        v: ir.Value,
        mask: ir.Value,
        probs: ir.Value,
        **bound: object,
    ) -> MatchResult:
        result = MatchResult()
        for name, value in (("Q", q), ("K", k), ("V", v)):
            if value.shape is None or value.shape.rank() != 4:
                return result.fail(f"{name} is not [batch, heads, sequence, head_dim]", value)
        assert q.shape is not None and k.shape is not None
        heads, kv_heads = q.shape[1], k.shape[1]
        if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
            return result.fail(f"{heads} query heads do not split into {kv_heads} kv groups", k)
        if bound.get("k_repeat") != bound.get("v_repeat"):
            return result.fail("K and V are repeated differently", k)
        repeat = bound.get("k_repeat")
        for name in ("k", "v"):
            if repeat == "interleave" and not _repeats_interleaved(bound[f"{name}_unsq"]):
                return result.fail(f"{name.upper()} is repeated on another axis than 2", k)
            if repeat == "tile" and not _tiles_heads(bound[f"{name}_tiled"], heads // kv_heads):
                return result.fail(f"{name.upper()} is tiled other than along the heads", k)
            if repeat == "none" and heads != kv_heads:
                return result.fail(f"{name.upper()} has {kv_heads} heads, Q {heads}, no repeat", k)
        softmax = probs.producer()
        assert softmax is not None
        if softmax.attributes.get_int("axis", -1) not in (-1, 3):
            return result.fail("Softmax is not over the key axis", probs)
        if self._scale(bound) is None:
            return result.fail("the score scale is not a constant nonzero scalar")
        if self.upcast and not _upcast_softmax(bound, q.dtype):
            return result.fail(f"the Casts around Softmax are not {q.dtype} → float32 → back", q)
        if self.masking == "where":
            fill = scalar(bound.get("fill"))  # type: ignore[arg-type]
            if fill is None or fill > VERY_NEGATIVE:
                return result.fail(f"Where fills {fill}, not a masking value", mask)
            if mask.dtype != ir.DataType.BOOL:
                return result.fail("Where condition is not boolean", mask)
        elif mask.dtype != q.dtype:
            return result.fail(f"additive mask is {mask.dtype}, scores are {q.dtype}", mask)
        if self.nan_guard and scalar(bound.get("guard_fill")) != 0.0:  # type: ignore[arg-type]
            return result.fail("the NaN guard does not replace NaN by 0")
        if mask.shape is None or mask.shape.rank() != 4 or mask.shape[2] != q.shape[2]:
            # onnxruntime's Attention does not broadcast the mask's query axis.
            return result.fail(f"mask shape {mask.shape} does not spell out the query axis", mask)
        if repeat == "tile" and mask.shape[1] not in (1, heads):
            # The query heads are reordered around Attention: a per-head mask must follow them.
            return result.fail(f"mask heads {mask.shape[1]} are neither 1 nor {heads}", mask)
        return result

    def _scale(self, bound: dict[str, object]) -> float | None:
        if self.scores in ("eager", "div"):
            scale = scalar(bound.get("scale"))  # type: ignore[arg-type]
            if self.scores == "eager" or scale is None:
                return scale
            return 1.0 / scale if scale else None
        a = scalar(bound.get("q_scale"))  # type: ignore[arg-type]
        b = scalar(bound.get("k_scale"))  # type: ignore[arg-type]
        return None if a is None or b is None else a * b

    def rewrite(self, op, q, k, v, mask, **bound):
        if self.masking == "where":
            # Where(masked_out, fill, scores): Attention wants True where a key may be seen.
            producer = mask.producer()
            if producer is not None and producer.op_type == "Not" and producer.domain == "":
                mask = producer.inputs[0]
            else:
                mask = op.Not(mask)
        # A float16/bfloat16 graph that takes its softmax in float32 says so to Attention.
        precision = {"softmax_precision": ir.DataType.FLOAT.value} if self.upcast else {}
        if bound.get("k_repeat") != "tile":
            return op.Attention(q, k, v, mask, scale=self._scale(bound), **precision)
        order = _tile_order(q.shape[1], k.shape[1])
        back = [order.index(h) for h in range(len(order))]
        q = op.Gather(q, op.Constant(value_ints=order), axis=1)
        if mask.shape[1] != 1:  # a mask or bias per head (ALiBi): in the heads' new order
            mask = op.Gather(mask, op.Constant(value_ints=order), axis=1)
        out = op.Attention(q, k, v, mask, scale=self._scale(bound), **precision)
        return op.Gather(out, op.Constant(value_ints=back), axis=1)


def _upcast_softmax(bound: dict[str, object], dtype: ir.DataType | None) -> bool:
    """Scores of a float16/bfloat16 graph cast to float32 for Softmax and back to their dtype
    (transformers' eager attention, `softmax(…, dtype=torch.float32).to(q.dtype)`)."""

    def cast_to(name: str) -> int | None:
        value = bound.get(name)
        node = value.producer() if isinstance(value, ir.Value) else None
        return node.attributes.get_int("to", 0) if node is not None else None

    return (
        dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        and cast_to("upcast") == ir.DataType.FLOAT.value
        and cast_to("downcast") == dtype.value
    )


def _tiles_heads(tiled: object, groups: int) -> bool:
    assert isinstance(tiled, ir.Value)
    node = tiled.producer()
    if node is None or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    repeats = node.inputs[1].const_value
    return repeats is not None and repeats.numpy().reshape(-1).tolist() == [1, groups, 1, 1]


def _repeats_interleaved(unsqueezed: object) -> bool:
    """repeat_kv inserts the group axis right after the kv-heads axis (axis 2)."""
    assert isinstance(unsqueezed, ir.Value)
    node = unsqueezed.producer()
    if node is None or len(node.inputs) < 2:
        return False
    axes = node.inputs[1]
    if axes is None or axes.const_value is None:
        return False
    return np.asarray(axes.const_value.numpy()).reshape(-1).tolist() in ([2], [-3])


rules = pattern.RewriteRuleSet(
    [
        AttentionFusion.rule(
            f"Attention[{scores},{masking}{',nan' if nan else ''}{',upcast' if upcast else ''}]",
            scores,
            masking,
            nan,
            upcast,
        )
        for scores in ("eager", "div", "sdpa")
        for masking in ("where", "add")
        for nan in (False, True)
        for upcast in (False, True)
    ],
    commute=True,
)
