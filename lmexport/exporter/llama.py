"""Llama → ONNX with the graph I/O of DESIGN.md: genai-style names, dynamic batch, sequence and
past length, position ids derived inside the graph from `attention_mask`."""

from __future__ import annotations

import re

import onnx
import torch
from torch import Tensor, nn

from ..models.llama import Llama
from .fused import FusedLlama
from .logits_to_keep import add_logits_to_keep
from .quiet import quiet_export
from .unused_outputs import drop_unused_outputs

# Default-domain opset of each target's graph: the fused targets need 23 for RMSNormalization,
# RotaryEmbedding and Attention.
OPSETS = {"ort": 23, "onnx": 23, "plain": 20}


def input_names(num_layers: int, kv_cache: bool) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *(past if kv_cache else [])]


def output_names(num_layers: int, kv_cache: bool) -> list[str]:
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["logits", *(present if kv_cache else [])]


class _WithCache(nn.Module):
    """Flat tensors in and out, in the order of `input_names` / `output_names`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, past: list[Tensor]
    ) -> tuple[Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.model(input_ids, attention_mask, cache)
        return logits, *[t for kv in presents for t in kv]


class _NoCache(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids, attention_mask)[0]


def export_llama(
    model: Llama, target: str = "plain", kv_cache: bool = True, rotary: str = "auto"
) -> onnx.ModelProto:
    """Trace `model` (already in the export dtype) with torch.export and return the ONNX graph.

    `plain` traces the eager modules into primitive ops; `ort` and `onnx` trace `FusedLlama`
    (`rotary` is its choice of where the `ort` graph rotates).
    """
    program = export_program(model, target, kv_cache, rotary)
    add_logits_to_keep(program.model)
    proto = program.model_proto
    name_total_sequence(proto)
    drop_unused_outputs(proto)
    return proto


def export_program(
    model: Llama,
    target: str = "plain",
    kv_cache: bool = True,
    rotary: str = "auto",
    optimize: bool = True,
) -> torch.onnx.ONNXProgram:
    """The traced program before serialization. `optimize=False` leaves the onnxscript
    optimizer to the caller: the streaming converter traces fake weights and runs it after
    standing in for them (exporter/skeleton.py)."""
    config = model.config
    traced: nn.Module = model if target == "plain" else FusedLlama(model, target, rotary)
    n = config.num_hidden_layers
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence")
    # Traced at sizes ≥ 2 so no dimension is specialised; the graph also runs with past length 0.
    ids = torch.zeros(2, 3, dtype=torch.int64)
    wrapper: nn.Module
    if kv_cache:
        past_len = torch.export.Dim("past_sequence")
        dtype = model.lm_head.weight.dtype
        past = [
            torch.zeros(2, config.n_kv_heads, 4, config.d_head, dtype=dtype) for _ in range(2 * n)
        ]
        args: tuple[object, ...] = (ids, torch.ones(2, 7, dtype=torch.int64), past)
        dynamic: dict[str, object] = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: torch.export.Dim("total_sequence")},
            "past": [{0: batch, 2: past_len}] * (2 * n),
        }
        wrapper = _WithCache(traced)
    else:
        args = (ids, torch.ones(2, 3, dtype=torch.int64))
        dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        wrapper = _NoCache(traced)

    with quiet_export():
        program = torch.onnx.export(
            wrapper.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=input_names(n, kv_cache),
            output_names=output_names(n, kv_cache),
            opset_version=OPSETS[target],
            optimize=optimize,
            verbose=False,
        )
    assert program is not None
    return program


def name_total_sequence(proto: onnx.ModelProto) -> None:
    """torch.export names the present length `past_sequence + sequence`; DESIGN.md calls it
    `total_sequence`, the same symbol as the attention mask's."""
    pattern = re.compile(r"^(past_sequence \+ sequence|sequence \+ past_sequence)$")
    values = [*proto.graph.output, *proto.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if pattern.match(dim.dim_param):
                dim.dim_param = "total_sequence"


def graph_io(proto: onnx.ModelProto) -> dict[str, list[dict[str, object]]]:
    """Names, dtypes and symbolic shapes of the graph's inputs and outputs, for `lmexport.json`."""

    def describe(values: list[onnx.ValueInfoProto]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            if t.elem_type == onnx.TensorProto.BFLOAT16:
                dtype = "bfloat16"
            out.append({"name": v.name, "dtype": dtype, "shape": shape})
        return out

    return {
        "inputs": describe(list(proto.graph.input)),
        "outputs": describe(list(proto.graph.output)),
    }
