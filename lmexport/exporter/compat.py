"""Refuse at convert time a graph that the installed onnxruntime cannot run.

Checked against onnxruntime's own operator registry, so the answer is about this install: every
node's op must be known at the graph's opset for its domain.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

from ..errors import LmexportError


def known_ops() -> dict[tuple[str, str], list[int]]:
    """(domain, op) → the opset versions at which the installed onnxruntime defines it."""
    table: dict[tuple[str, str], list[int]] = {}
    for schema in ort_c.get_all_operator_schema():
        domain = "" if schema.domain == "ai.onnx" else schema.domain
        table.setdefault((domain, schema.name), []).append(schema.since_version)
    return table


def check_runnable(model: onnx.ModelProto, target: str) -> None:
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    table = known_ops()
    for node in model.graph.node:
        opset = opsets.get(node.domain, 1)
        versions = table.get((node.domain, node.op_type), [])
        if not any(v <= opset for v in versions):
            where = node.domain or "ai.onnx"
            raise LmexportError(
                f"target {target!r} needs {node.op_type} ({where} opset {opset}), which "
                f"onnxruntime {ort.__version__} does not implement; install a newer onnxruntime "
                "or choose another --target"
            )
