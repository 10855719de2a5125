"""Residual Add + `RMSNormalization` → `com.microsoft::SkipSimplifiedLayerNormalization` (`ort`).

In a pre-norm decoder every norm after the first normalises `residual + block_output`, and that
sum is the residual stream the next block adds to. The contrib op computes both in one kernel:
its output 0 is the norm, its output 3 (`input_skip_bias_sum`) takes the Add's place for every
other consumer. Run after `rms_norm`, which produces the `RMSNormalization` nodes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern


class SkipRMSNormFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, input, skip, gamma):
        total = op.Add(input, skip)
        return op.RMSNormalization(total, gamma, _outputs=["normalized"]), total

    def check(  # type: ignore[override]  # the rewriter passes the bindings by name
        self,
        context: object,
        input: ir.Value,
        skip: ir.Value,
        gamma: ir.Value,
        normalized: ir.Value,
        **_: object,
    ) -> MatchResult:
        result = MatchResult()
        if input.shape is None or input.shape.rank() != 3:
            return result.fail(f"input shape {input.shape} is not [batch, sequence, hidden]", input)
        if skip.shape is None or not _same_shape(input.shape, skip.shape):
            return result.fail(f"skip shape {skip.shape} is not the input's {input.shape}", skip)
        hidden = input.shape[-1]
        if gamma.shape is None or gamma.shape.rank() != 1 or gamma.shape[0] != hidden:
            return result.fail(f"gamma shape {gamma.shape} is not [{hidden}]", gamma)
        if not input.dtype == skip.dtype == gamma.dtype:
            return result.fail(
                f"input, skip and gamma dtypes differ: {input.dtype}, {skip.dtype}, {gamma.dtype}"
            )
        node = normalized.producer()
        assert node is not None
        if node.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("RMSNormalization does not normalise the last axis", node)
        if node.attributes.get_int("stash_type", 1) != 1:
            return result.fail("RMSNormalization stash_type is not float32", node)
        return result

    def rewrite(self, op, input, skip, gamma, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        out, _mean, _inv_std_var, total = op.SkipSimplifiedLayerNormalization(
            input, skip, gamma, epsilon=epsilon, _domain="com.microsoft", _outputs=4
        )
        return out, total


def _same_shape(a: ir.Shape, b: ir.Shape) -> bool:
    """Dimension by dimension equal and known: equal numbers or equal named symbols."""
    return a.rank() == b.rank() and all(
        d == e and (isinstance(d, int) or d.value is not None) for d, e in zip(a, b, strict=True)
    )


rules = pattern.RewriteRuleSet([SkipRMSNormFusion.rule("SkipSimplifiedLayerNormalization")])
