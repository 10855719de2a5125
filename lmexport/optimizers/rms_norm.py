"""RMSNorm subgraph → ONNX opset 23 `RMSNormalization`, for both the `onnx` and `ort` targets.

`ort` gets the standard op too: onnxruntime's own `SimplifiedLayerNormalization` sits in the
default domain, where `onnx.checker` rejects it, and onnxruntime ≥ 1.23 runs `RMSNormalization`.

Matched, in the forms exporters emit (Add and Mul in either input order):

    h = x, or Cast(x) to float32 (fp16/bf16 models normalise in fp32)
    ms = ReduceMean(Pow(h, 2) | Mul(h, h), last axis, keepdims=1) + eps
    n = h * Reciprocal(Sqrt(ms)) | h * Div(1, Sqrt(ms)) | h * Pow(ms, -0.5) | Div(h, Sqrt(ms))
    y = n, or Cast(n) back to x's dtype
    out = y * weight

`RMSNormalization(x, weight, stash_type=1)` computes exactly this: in float32, the normalised
value cast back to x's dtype before the scale. The caller makes the model opset 23 first.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from .constants import scalar


class RMSNormFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, axes, epsilon, weight):
        # tag_var: onnxscript 0.7 cannot clone (commute) an untagged backtracking OrValue.
        h = pattern.OrValue([op.Cast(x), x], name="h", tag_var="cast_in")
        square = pattern.OrValue([op.Pow(h, 2.0), op.Mul(h, h)])
        ms = op.Add(op.ReduceMean(square, axes, _outputs=["mean"]), epsilon)
        rms = op.Sqrt(ms)
        inv_rms = pattern.OrValue([op.Reciprocal(rms), op.Div(1.0, rms), op.Pow(ms, -0.5)])
        normalized = pattern.OrValue([op.Mul(h, inv_rms), op.Div(h, rms)])
        y = pattern.OrValue([op.Cast(normalized), normalized], name="y", tag_var="cast_out")
        return op.Mul(y, weight)

    def check(  # type: ignore[override]  # the rewriter passes the bindings by name
        self,
        context: object,
        x: ir.Value,
        h: ir.Value,
        y: ir.Value,
        mean: ir.Value,
        axes: ir.Value,
        epsilon: ir.Value,
        weight: ir.Value,
        **_: object,
    ) -> MatchResult:
        result = MatchResult()
        if h.dtype != ir.DataType.FLOAT:
            return result.fail(f"normalised in {h.dtype}, RMSNormalization stashes in float32", h)
        if y.dtype != x.dtype:
            return result.fail(f"normalised value is {y.dtype}, not cast back to {x.dtype}", y)
        if weight.dtype != x.dtype:
            return result.fail(f"weight is {weight.dtype}, input is {x.dtype}", weight)
        if x.shape is None or x.shape.rank() == 0:
            return result.fail("input shape unknown", x)
        rank = x.shape.rank()
        if axes.const_value is None:
            return result.fail("ReduceMean axes are not a constant", axes)
        axis_list = axes.const_value.numpy().reshape(-1).tolist()
        if axis_list not in ([-1], [rank - 1]):
            return result.fail(
                f"ReduceMean over axes {axis_list} of a rank-{rank} input, not the last axis", mean
            )
        reduce = mean.producer()
        assert reduce is not None
        if reduce.attributes.get_int("keepdims", 1) != 1:
            return result.fail("ReduceMean drops the reduced axis (keepdims=0)", mean)
        if scalar(epsilon) is None:
            return result.fail("epsilon is not a constant scalar", epsilon)
        size = x.shape[-1]
        if weight.shape is None or weight.shape.rank() != 1 or weight.shape[0] != size:
            return result.fail(f"weight shape {weight.shape} is not [{size}]", weight)
        return result

    def rewrite(self, op, x, epsilon, weight, **_):
        return op.RMSNormalization(
            x, weight, axis=-1, epsilon=scalar(epsilon), stash_type=ir.DataType.FLOAT.value
        )


rules = pattern.RewriteRuleSet([RMSNormFusion.rule("RMSNormalization")], commute=True)
