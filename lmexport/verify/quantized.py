"""Verifying a quantized folder: against the source with the folder's own quantization applied
to its weights (each replaced by dequantize(quantize(weight)), by the same quantizer).

The graph is checked twice. With its MatMulNBits set to accuracy level 0 (float activations) it
must match that reference to float rounding, whatever the quantization costs the model: a
broken layout, scale or zero point stands out, on random or trained weights alike. As shipped
(int8 activations at level 4) it is compared with the level-0 graph; that difference depends
on the model's activations (KL ~1e-4 on random weights, ~0.01 on SmolLM2-135M). The cost of
the quantization against float32 is what convert measured and recorded (`quantization.accuracy`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..models.llama import Llama
from ..onnx_files import save_onnx
from ..quantize import dequantize_blocks, quantize_blocks
from ..runtime.llama import LlamaRunner
from ..runtime.manifest import MANIFEST, MODEL_FILE
from .metrics import kl_divergence, top1_agreement
from .report import Check

COMPUTE_TOP1, COMPUTE_KL = 0.8, 0.05


def _fake_quantized(
    weight: torch.Tensor, record: dict[str, Any], bits: int, offsets: bool
) -> nn.Parameter:
    q = quantize_blocks(
        weight.detach().float().numpy(),
        bits,
        record["block_size"],
        bool(record.get("symmetric", False)),
        offsets,
    )
    return nn.Parameter(torch.from_numpy(dequantize_blocks(q)).to(weight.dtype))


@torch.no_grad()
def apply_quantization(model: Llama, record: dict[str, Any]) -> None:
    """Quantize `model`'s weights in place as `record` (lmexport.json's `quantization`) says.
    New parameters, not copies, so a tied LM head and embedding come apart as in the graph."""
    offsets = bool(record.get("offsets", False))  # MatMuls only, as quantize/graph.py does
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name != "lm_head" or record["lm_head"]):
            bits = record.get("lm_head_bits", record["bits"]) if name == "lm_head" else None
            module.weight = _fake_quantized(module.weight, record, bits or record["bits"], offsets)
    if record["embedding"]:
        embedding = model.model.embed_tokens
        embedding.weight = _fake_quantized(embedding.weight, record, record["bits"], False)


def exact_runner(runner: LlamaRunner, folder: Path) -> LlamaRunner:
    """The folder's graph with every MatMulNBits at accuracy level 0 (float activations),
    written to `folder`: it computes with exactly the quantized weights, so against the
    quantized source it must agree to float rounding, like a float32 export."""
    model = onnx.load(str(runner.folder / MODEL_FILE))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    save_onnx(model, folder / MODEL_FILE, MODEL_FILE + ".data")
    (folder / MANIFEST).write_text(json.dumps(runner.manifest))
    return LlamaRunner.load(folder, provider=runner.provider)


def compute_check(shipped: LlamaRunner, exact: LlamaRunner, ids: np.ndarray) -> Check:
    """The shipped graph (int8 activations at accuracy level 4) against float activations."""
    level = shipped.manifest["quantization"]["accuracy_level"]
    ref, got = exact.logits(ids), shipped.logits(ids)
    metrics: dict[str, float | int | str] = {
        "top1": top1_agreement(ref, got),
        "kl": kl_divergence(ref, got),
        "accuracy_level": level,
    }
    ok = float(metrics["top1"]) >= COMPUTE_TOP1 and float(metrics["kl"]) <= COMPUTE_KL
    inputs = f"batch {ids.shape[0]} x {ids.shape[1]} random ids, vs accuracy level 0"
    return Check("quantized_compute", ok, metrics, inputs)
