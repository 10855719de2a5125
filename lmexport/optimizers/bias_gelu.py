"""`ort`: Gelu(Gemm(x, W, bias)) → com.microsoft::BiasGelu(Gemm(x, W), bias) (HorNet's MLP).

onnxruntime's Gemm adds a bias by first broadcasting it into the whole output, on one thread,
before the multiply accumulates onto it: for the MLP's first layer (4·dim wide) that is a pass over
the largest activation of the block. BiasGelu adds the bias inside its Gelu pass (the exact, erf
Gelu: identical results), so the Gemm runs without one. Only plain Gemms match: alpha 1, A not
transposed, a 1-D bias of the output's width, the exact Gelu.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern


class BiasGeluFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, weight, bias):
        product = op.Gemm(x, weight, bias, _allow_other_attributes=True, _outputs=["product"])
        return op.Gelu(product, _allow_other_attributes=True, _outputs=["activated"])

    def check(  # type: ignore[override]  # the rewriter passes the bindings by name
        self,
        context: object,
        weight: ir.Value,
        bias: ir.Value,
        product: ir.Value,
        activated: ir.Value,
        **_: object,
    ) -> MatchResult:
        result = MatchResult()
        gemm, gelu = product.producer(), activated.producer()
        assert gemm is not None and gelu is not None
        attributes = gemm.attributes
        if attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0:
            return result.fail("Gemm scales its product or its bias", gemm)
        if attributes.get_int("transA", 0) != 0:
            return result.fail("Gemm transposes its input", gemm)
        if gelu.attributes.get_string("approximate", "none") != "none":
            return result.fail("Gelu is the tanh approximation, BiasGelu computes erf", gelu)
        width = None
        if weight.shape is not None and weight.shape.rank() == 2:
            width = weight.shape[0 if attributes.get_int("transB", 0) else 1]
        if bias.shape is None or bias.shape.rank() != 1 or not isinstance(width, int):
            return result.fail(f"bias shape {bias.shape} is not [output width]", bias)
        if bias.shape[0] != width:
            return result.fail(f"bias shape {bias.shape} is not [{width}]", bias)
        return result

    def rewrite(self, op, x, weight, bias, product, **_):
        trans_b = product.producer().attributes.get_int("transB", 0)
        return op.BiasGelu(op.Gemm(x, weight, transB=trans_b), bias, _domain="com.microsoft")


rules = pattern.RewriteRuleSet([BiasGeluFusion.rule("BiasGelu")])
