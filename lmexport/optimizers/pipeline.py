"""`optimize`: clean up, fuse, clean up again — ONNX in, ONNX out, with a report of what fused.

The fused ops are opset 23, so a graph below it is converted to 23 before fusing, whether
anything fuses or not (onnxscript's version converter; onnx's own for graphs below opset 18).
Refusals come from a second, tracing pass of each fusion after it was applied: what still
matches there is exactly what `check()` turned down.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript import version_converter
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, RewriteRule, pattern

from ..errors import LmexportError
from ..exporter.quiet import errors_only
from ..exporter.unused_outputs import drop_unused_outputs
from . import attention, gqa, qkv_pack, rms_norm, rotary, silu, skip_rms_norm
from .report import Fusion, Report

OPSET = 23
TARGETS = ("ort", "onnx")
MAX_POSITIONS = 8192  # rows of the rotary cos/sin caches when the graph computes its angles
# onnx_ir warns whenever its deduplication leaves out an initializer that is also a graph input,
# as our Llama graphs' overridable `logits_to_keep` is, on purpose.
_DEDUPLICATION_LOG = "onnx_ir.passes.common.initializer_deduplication"


def fusions(target: str, max_positions: int) -> list[tuple[str, pattern.RewriteRuleSet]]:
    """The fusions for `target`, in the order they must run; fresh rules for every model."""
    steps = [
        ("rms_norm", rms_norm.rules),
        ("rotary", rotary.make_rules(target, max_positions)),
        ("attention", attention.rules),
    ]
    if target == "ort":
        steps += [
            ("group_query_attention", gqa.rules),
            ("qkv_packing", qkv_pack.rules),
            ("skip_rms_norm", skip_rms_norm.rules),
            ("silu", silu.rules),
        ]
    return steps


def optimize_model(
    model: onnx.ModelProto, target: str, max_positions: int = MAX_POSITIONS
) -> tuple[onnx.ModelProto, Report]:
    """The fused graph for `target` (`ort` or `onnx`) and the report; `model` is left as it is."""
    if target not in TARGETS:
        raise LmexportError(f"unknown optimize target {target!r} (choose from ort, onnx)")
    graph = ir.serde.deserialize_model(model)
    nodes_before = len(graph.graph)
    with errors_only(_DEDUPLICATION_LOG):
        onnxscript.optimizer.optimize(graph)
        if graph.opset_imports.get("", OPSET) < OPSET:
            version_converter.convert_version(graph, OPSET, fallback=True)
        done = [_fuse(name, rules, graph) for name, rules in fusions(target, max_positions)]
        onnxscript.optimizer.optimize(graph)
    fused = ir.serde.serialize_model(graph)
    drop_unused_outputs(fused)
    return fused, Report(done, nodes_before, len(graph.graph))


def _fuse(name: str, rules: pattern.RewriteRuleSet, graph: ir.Model) -> Fusion:
    applied = rules.apply_to_model(graph)
    # Rules that keep matched nodes (their intermediates feed shape computations) leave them
    # dead, and rules that build the same helper values per layer leave twins: the next fusion
    # must see neither as a difference between layers or as other uses of what it matches.
    ir.passes.common.RemoveUnusedNodesPass()(graph)
    ir.passes.common.CommonSubexpressionEliminationPass()(graph)
    refusals = _Refusals()
    rules.apply_to_model(graph, tracer=refusals)  # with a tracer the rewriter changes nothing
    return Fusion(name, applied, list(refusals.reasons))


class _Refusals(MatchingTracer):
    """Records each match that `check()` or `rewrite()` turned down, with the reason."""

    def __init__(self) -> None:
        super().__init__()
        # An ordered set: the commuted variants of a rule report the same refusal again.
        self.reasons: dict[str, None] = {}

    def log(
        self,
        rule: RewriteRule,
        container: ir.Graph | ir.Function,
        node: ir.Node,
        match_result: MatchResult,
        status: MatchStatus,
    ) -> None:
        if status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED):
            self.reasons[f"{node.name or node.op_type}: {match_result.reason}"] = None
