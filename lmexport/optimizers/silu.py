"""`ort`: x · Sigmoid(x) (SiLU, the gate of SwiGLU) → com.microsoft::QuickGelu with alpha 1.

QuickGelu computes x · sigmoid(alpha · x), which for alpha = 1 is exactly SiLU, in one kernel
instead of two.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern


class SiLUFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x):
        return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")


rules = pattern.RewriteRuleSet([SiLUFusion.rule("QuickGelu")], commute=True)
