"""`ort`: three projections of one input feeding GroupQueryAttention → one packed MatMul.

Matched after `group_query_attention` folded rotary into the op (otherwise q and k pass through
RotaryEmbedding first and do not come straight from their MatMuls):

    GroupQueryAttention(MatMul(h, Wq), MatMul(h, Wk), MatMul(h, Wv), …)
    → GroupQueryAttention(MatMul(h, [Wq | Wk | Wv]), <none>, <none>, …)

One pass over h and one weight read instead of three; the op splits the packed heads itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern


class QKVPacking(pattern.RewriteRuleClassBase):
    def pattern(self, op, h, wq, wk, wv):
        return op.GroupQueryAttention(
            op.MatMul(h, wq),
            op.MatMul(h, wk),
            op.MatMul(h, wv),
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _domain="com.microsoft",
            _outputs=["out", "present_key", "present_value"],
        )

    def check(  # type: ignore[override]  # the rewriter passes the bindings by name
        self, context: object, wq: ir.Value, wk: ir.Value, wv: ir.Value, **_: object
    ) -> MatchResult:
        result = MatchResult()
        weights = [w.const_value for w in (wq, wk, wv)]
        if any(w is None for w in weights):
            return result.fail("a projection weight is not a constant", wq)
        shapes = [w.shape for w in weights if w is not None]
        if any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
            return result.fail(f"projection weights {[list(s) for s in shapes]} do not stack")
        return result

    def rewrite(self, op, h, wq, wk, wv, out, **_):
        node = out.producer()
        packed = np.concatenate([w.const_value.numpy() for w in (wq, wk, wv)], axis=1)
        weight = op.initializer(ir.tensor(packed), name=f"{wq.name}_qkv")
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        return op.GroupQueryAttention(
            op.MatMul(h, weight),
            None,
            None,
            *node.inputs[3:],
            **attributes,
            _domain="com.microsoft",
            _outputs=3,
        )


rules = pattern.RewriteRuleSet([QKVPacking.rule("PackedQKV")])
