"""Each fusion on a minimal graph exported from a small torch module, where it must fire and
where it must not (the graph then stays as it was and the report says why)."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

from lmexport.optimizers import optimize_model
from lmexport.optimizers.command import check_same

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def export(
    module: nn.Module, args: tuple[Tensor, ...], names: list[str], path: Path
) -> onnx.ModelProto:
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    seq_axis = {
        n: ({0: dims[0], 2: dims[1]} if a.dim() == 4 else dims)
        for n, a in zip(names, args, strict=True)
    }
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=seq_axis, input_names=names, verbose=False
        )
    assert program is not None
    program.save(str(path))
    return onnx.load(str(path))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TableRotary(nn.Module):
    """cos/sin gathered from tables by positions, as some exporters precompute them."""

    def __init__(self, cos_rows: int, sin_rows: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        angles = torch.outer(torch.arange(max(cos_rows, sin_rows)).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos()[:cos_rows])
        self.register_buffer("sin", angles.sin()[:sin_rows])

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return x * cos + rotate_half(x) * sin


def rotary_inputs() -> tuple[Tensor, Tensor]:
    x = torch.randn(2, HEADS, 5, HEAD_DIM)
    return x, torch.arange(5).repeat(2, 1)


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_rotary_from_tables(target: str, tmp_path: Path) -> None:
    model = export(TableRotary(64, 64), rotary_inputs(), ["x", "positions"], tmp_path / "m.onnx")
    fused, _ = optimize_model(model, target)
    assert Counter(n.op_type for n in fused.graph.node)["RotaryEmbedding"] == 1
    assert check_same(model, fused) <= 1e-5


def test_rotary_with_mismatched_tables_is_refused(tmp_path: Path) -> None:
    model = export(TableRotary(64, 32), rotary_inputs(), ["x", "positions"], tmp_path / "m.onnx")
    fused, report = optimize_model(model, "onnx")
    assert "RotaryEmbedding" not in {n.op_type for n in fused.graph.node}
    rotary = next(f for f in report.fusions if f.name == "rotary")
    assert rotary.applied == 0
    assert any("tables" in reason for reason in rotary.refused), rotary.refused


class PaddingOnlyAttention(nn.Module):
    """Grouped attention with a padding mask but no causal mask (an encoder, say)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(2, 3)) * HEAD_DIM**-0.5
        allowed = mask.bool()[:, None, None, :].expand(-1, 1, q.shape[2], -1)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v


def attention_inputs() -> tuple[Tensor, ...]:
    q = torch.randn(2, HEADS, 5, HEAD_DIM)
    k, v = torch.randn(2, KV_HEADS, 5, HEAD_DIM), torch.randn(2, KV_HEADS, 5, HEAD_DIM)
    return q, k, v, torch.ones(2, 5, dtype=torch.int64)


def test_attention_without_causal_mask(tmp_path: Path) -> None:
    """Attention-23 takes any mask; GroupQueryAttention is causal, so `ort` must not use it."""
    model = export(
        PaddingOnlyAttention(), attention_inputs(), ["q", "k", "v", "mask"], tmp_path / "m.onnx"
    )
    fused, report = optimize_model(model, "onnx")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 1 and ops["Softmax"] == 0
    assert check_same(model, fused) <= 1e-5

    fused, report = optimize_model(model, "ort")
    assert "GroupQueryAttention" not in {n.op_type for n in fused.graph.node}
    gqa = next(f for f in report.fusions if f.name == "group_query_attention")
    assert gqa.applied == 0
    assert check_same(model, fused) <= 1e-5


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.silu(self.gate(x)) * self.up(x)


def test_silu_becomes_quick_gelu_for_ort(tmp_path: Path) -> None:
    model = export(SwiGLU(), (torch.randn(2, 5, 8),), ["x"], tmp_path / "m.onnx")
    fused, report = optimize_model(model, "ort")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["QuickGelu"] == 1 and ops["Sigmoid"] == 0
    assert check_same(model, fused) <= 1e-5
    assert np.isclose(next(f for f in report.fusions if f.name == "silu").applied, 1)


class InterleavedRotary(nn.Module):
    """Rotary on pairs of channels (GPT-J, Meta's complex form written with real tensors)."""

    def __init__(self) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_interleaved_rotary(target: str, tmp_path: Path) -> None:
    model = export(InterleavedRotary(), rotary_inputs(), ["x", "positions"], tmp_path / "m.onnx")
    fused, _ = optimize_model(model, target)
    (rotary,) = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
    assert next(a.i for a in rotary.attribute if a.name == "interleaved") == 1
    assert check_same(model, fused) <= 1e-5


class TiledAttention(PaddingOnlyAttention):
    """Grouped attention whose K/V repeat is Tensor.repeat (Tile): query head h reads kv head
    h % kv_heads, not h // groups as repeat_kv pairs them."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
        scores = (q @ k.transpose(2, 3)) * HEAD_DIM**-0.5
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        allowed = causal[None, None] & mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v


def test_tiled_kv_repeat(tmp_path: Path) -> None:
    model = export(
        TiledAttention(), attention_inputs(), ["q", "k", "v", "mask"], tmp_path / "m.onnx"
    )
    fused, _ = optimize_model(model, "onnx")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 1 and ops["Tile"] == 0 and ops["Softmax"] == 0
    assert check_same(model, fused) <= 1e-5
