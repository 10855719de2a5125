"""Each fusion on a minimal graph exported from a small torch module, where it must fire and
where it must not (the graph then stays as it was and the report says why)."""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from lmexport.optimizers import optimize_model
from lmexport.optimizers.check import check_same

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    names: list[str],
    path: Path,
    dynamic: dict[str, dict[int, Any]] | None = None,
) -> onnx.ModelProto:
    """Batch and sequence dynamic ([b, heads, s, d] or [b, s, …]), unless `dynamic` says."""
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    seq_axis = dynamic or {
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


def run_both(
    model: onnx.ModelProto, fused: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The first output of each graph in onnxruntime on the same inputs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before, after = (
        ort.InferenceSession(m.SerializeToString(), options, ["CPUExecutionProvider"]).run(
            None, feeds
        )[0]
        for m in (model, fused)
    )
    return before, after


# check_same pads one position of one row, and feeds positions below 4 to a graph that gathers
# them from a table by GatherND (TableRotary): these go further. The second row is left-padded
# by two; its first two queries see no key.
LEFT_PADDED = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.int64)
FAR_POSITIONS = np.arange(5) + np.array([[0], [300]])


def assert_real_rows_match(
    model: onnx.ModelProto, fused: onnx.ModelProto, feeds: dict[str, np.ndarray], axis: int
) -> None:
    """The graphs agree at every query position of `axis` that LEFT_PADDED marks real (a fully
    masked row is not compared: fused Attention gives zeros where the graph averages)."""
    before, after = run_both(model, fused, feeds)
    for row, real in enumerate(LEFT_PADDED.astype(bool)):
        b, a = (np.compress(real, out[row], axis=axis - 1) for out in (before, after))
        assert np.abs(b - a).max() <= 1e-5, row


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


def padded_attention_feeds() -> dict[str, np.ndarray]:
    q, k, v, _ = (t.numpy() for t in attention_inputs())
    return {"q": q, "k": k, "v": v, "mask": LEFT_PADDED}


def test_attention_without_causal_mask(tmp_path: Path) -> None:
    """Attention-23 takes any mask; GroupQueryAttention is causal, so `ort` must not use it."""
    model = export(
        PaddingOnlyAttention(), attention_inputs(), ["q", "k", "v", "mask"], tmp_path / "m.onnx"
    )
    fused, report = optimize_model(model, "onnx")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 1 and ops["Softmax"] == 0
    assert check_same(model, fused) <= 1e-5
    assert_real_rows_match(model, fused, padded_attention_feeds(), axis=2)

    fused, report = optimize_model(model, "ort")
    assert "GroupQueryAttention" not in {n.op_type for n in fused.graph.node}
    gqa = next(f for f in report.fusions if f.name == "group_query_attention")
    assert gqa.applied == 0
    assert check_same(model, fused) <= 1e-5
    assert_real_rows_match(model, fused, padded_attention_feeds(), axis=2)


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
    x = rotary_inputs()[0].numpy()
    before, after = run_both(model, fused, {"x": x, "positions": FAR_POSITIONS})
    assert np.abs(before - after).max() <= 1e-5  # rows 300 and on, named


def causal_probs(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the keys that both the causal and the padding mask allow."""
    causal = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)


class TiledAttention(nn.Module):
    """Grouped attention whose K/V repeat is Tensor.repeat (Tile): query head h reads kv head
    h % kv_heads, not h // groups as repeat_kv pairs them."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
        return causal_probs((q @ k.transpose(2, 3)) * HEAD_DIM**-0.5, mask) @ v


def test_tiled_kv_repeat(tmp_path: Path) -> None:
    model = export(
        TiledAttention(), attention_inputs(), ["q", "k", "v", "mask"], tmp_path / "m.onnx"
    )
    fused, _ = optimize_model(model, "onnx")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 1 and ops["Tile"] == 0 and ops["Softmax"] == 0
    assert check_same(model, fused) <= 1e-5
    assert_real_rows_match(model, fused, padded_attention_feeds(), axis=2)


class DivScaleAttention(nn.Module):
    """Scores divided by sqrt(head_dim), as ordinary code writes it (an ONNX Div)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return causal_probs(q @ k.transpose(2, 3) / math.sqrt(HEAD_DIM), mask) @ v


def test_attention_with_divided_scores(tmp_path: Path) -> None:
    model = export(
        DivScaleAttention(), attention_inputs(), ["q", "k", "v", "mask"], tmp_path / "m.onnx"
    )
    fused, _ = optimize_model(model, "onnx")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 1 and ops["Div"] == 0 and ops["Softmax"] == 0
    (attention,) = [n for n in fused.graph.node if n.op_type == "Attention"]
    scale = next(a.f for a in attention.attribute if a.name == "scale")
    assert np.isclose(scale, HEAD_DIM**-0.5)
    assert check_same(model, fused) <= 1e-4
    assert_real_rows_match(model, fused, padded_attention_feeds(), axis=2)


class TiledBiasAttention(nn.Module):
    """Tile K/V repeat with an additive bias per query head ([1, heads, s, t], ALiBi-style)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
        scores = (q @ k.transpose(2, 3)) * HEAD_DIM**-0.5 + bias
        return scores.softmax(-1) @ v


def test_tiled_kv_repeat_with_per_head_bias(tmp_path: Path) -> None:
    """The query heads are reordered around Attention; the bias's heads must follow them."""
    q, k, v, _ = attention_inputs()
    slopes = -torch.arange(1, HEADS + 1).float()[:, None, None]
    bias = (slopes * torch.arange(5).float()).expand(HEADS, 5, 5)[None].contiguous()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    heads4 = {0: batch, 2: seq}
    dynamic = {"q": heads4, "k": heads4, "v": heads4, "bias": {2: seq, 3: seq}}
    names = ["q", "k", "v", "bias"]
    model = export(TiledBiasAttention(), (q, k, v, bias), names, tmp_path / "m.onnx", dynamic)
    fused, _ = optimize_model(model, "onnx")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 1 and ops["Tile"] == 0 and ops["Softmax"] == 0
    feeds = dict(zip(names, (t.numpy() for t in (q, k, v, bias)), strict=True))
    before, after = run_both(model, fused, feeds)
    assert np.abs(before - after).max() <= 1e-4


class GroupedBlock(nn.Module):
    """Projections → heads → rotary → grouped attention → merged heads (what becomes
    GroupQueryAttention), masked by a causal comparison of positions or by padding only."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        width = 64
        self.q = nn.Linear(width, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(width, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(width, KV_HEADS * HEAD_DIM, bias=False)
        self.rotary = InterleavedRotary()
        self.causal = causal

    def scores(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled Q·Kᵀ of the rotated heads, and the values, both repeated to every head."""
        b, s, _ = x.shape
        q = self.q(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        return (q @ k.transpose(2, 3)) * HEAD_DIM**-0.5, v

    def forward(self, x: Tensor, positions: Tensor, attention_mask: Tensor) -> Tensor:
        b, s, _ = x.shape
        scores, v = self.scores(x, positions)
        allowed = (attention_mask > 0)[:, None, None, :].expand(-1, 1, s, -1)
        if self.causal:
            index = torch.arange(s)
            allowed = allowed & (index[None, :] <= index[:, None])[None, None]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "padding_only"])
def test_group_query_attention_needs_a_causal_mask(causal: bool, tmp_path: Path) -> None:
    """`attention_mask > 0` is a comparison too, but of the mask, not of positions: a graph
    masked by it alone keeps Attention (GroupQueryAttention would add a causal mask)."""
    fused_block(GroupedBlock(causal), causal, tmp_path)


def fused_block(
    block: nn.Module, causal: bool, tmp_path: Path
) -> tuple[onnx.ModelProto, onnx.ModelProto, Tensor, Tensor]:
    """The block exported and optimized for `ort`, checked: GroupQueryAttention if its mask is
    `causal`, else Attention with the refusal's reason; the two graphs agree either way."""
    x, positions = torch.randn(2, 5, 64), torch.arange(5).repeat(2, 1)
    args = (x, positions, torch.ones(2, 5, dtype=torch.int64))
    names = ["x", "positions", "attention_mask"]
    model = export(block, args, names, tmp_path / "m.onnx")
    fused, report = optimize_model(model, "ort")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["GroupQueryAttention"] == int(causal) and ops["Attention"] == int(not causal)
    if not causal:
        gqa = next(f for f in report.fusions if f.name == "group_query_attention")
        assert any("no causal part" in reason for reason in gqa.refused), gqa.refused
    assert check_same(model, fused) <= 1e-4
    return model, fused, x, positions
    feeds = {"x": x.numpy(), "positions": FAR_POSITIONS, "attention_mask": LEFT_PADDED}
    assert_real_rows_match(model, fused, feeds, axis=1)


class SequenceFirstRotary(nn.Module):
    """Rotary on x laid out [batch, sequence, heads, head_dim]: cos/sin unsqueezed at axis 2."""

    def __init__(self, interleaved: bool) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq)
        self.interleaved = interleaved

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        if self.interleaved:
            cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
            x1, x2 = x[..., ::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
        return x * cos + rotate_half(x) * sin


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_rotary_on_sequence_first_layout_is_refused(interleaved: bool, tmp_path: Path) -> None:
    x = torch.randn(2, 5, HEADS, HEAD_DIM)
    positions = torch.arange(5).repeat(2, 1) + torch.tensor([[0], [3]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"x": {0: batch, 1: seq}, "positions": {0: batch, 1: seq}}
    model = export(
        SequenceFirstRotary(interleaved), (x, positions), ["x", "positions"],
        tmp_path / "m.onnx", dynamic,
    )  # fmt: skip
    for target in ("ort", "onnx"):
        fused, report = optimize_model(model, target)
        assert "RotaryEmbedding" not in {n.op_type for n in fused.graph.node}
        rotary = next(f for f in report.fusions if f.name == "rotary")
        assert any("[batch, 1, seq, d]" in reason for reason in rotary.refused), rotary.refused
        # seq == heads: a fused graph would run, rotating each head by another position.
        x = torch.randn(2, HEADS, HEADS, HEAD_DIM)
        feeds = {"x": x.numpy(), "positions": positions[:, :HEADS].numpy()}
        before, after = run_both(model, fused, feeds)
        assert np.abs(before - after).max() <= 1e-4


class HalfRotary(InterleavedRotary):
    """Rotate-half rotary of x [batch, heads, seq, head_dim] at positions [batch or 1, seq]."""

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return x * cos + rotate_half(x) * sin


def test_check_same_reaches_rotary_rows_past_the_first(tmp_path: Path) -> None:
    """check_same draws positions up to 4096 for a graph that computes cos/sin from them: a
    fused cache wrong from row 64 on is caught."""
    model = export(HalfRotary(), rotary_inputs(), ["x", "positions"], tmp_path / "m.onnx")
    fused, _ = optimize_model(model, "onnx")
    assert check_same(model, fused) <= 1e-5
    rotary = next(n for n in fused.graph.node if n.op_type == "RotaryEmbedding")
    tables = {t.name: t for t in fused.graph.initializer}
    (cos_name,) = [name for name in rotary.input if name in tables and "cos" in name]
    cos = numpy_helper.to_array(tables[cos_name]).copy()
    cos[64:] = 0.0
    tables[cos_name].CopyFrom(numpy_helper.from_array(cos, cos_name))
    assert check_same(model, fused) > 1e-2


class Float16Rotary(HalfRotary):
    """A float16 model's rotary: angles in float32 (as transformers keeps inv_freq) with cos/sin
    cast to float16, or the angles themselves in float16 (inv_freq rounded with the model)."""

    def __init__(self, angles: torch.dtype) -> None:
        super().__init__()
        self.angles = angles
        self.inv_freq = self.inv_freq.to(angles)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.to(self.angles)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().half()[:, None], angles.sin().half()[:, None]
        return x * cos + rotate_half(x) * sin


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_float16_rotary(target: str, tmp_path: Path) -> None:
    """cos/sin cast to float16 after float32 angles fuse, with the cache rounded the same way."""
    x, positions = rotary_inputs()
    args = (x.half(), positions)
    model = export(Float16Rotary(torch.float32), args, ["x", "positions"], tmp_path / "m.onnx")
    fused, _ = optimize_model(model, target)
    assert Counter(n.op_type for n in fused.graph.node)["RotaryEmbedding"] == 1
    far = {"x": args[0].numpy(), "positions": FAR_POSITIONS + 3000}
    before, after = run_both(model, fused, far)
    assert np.abs(before.astype(np.float32) - after).max() <= 1e-2


def test_float16_angles_are_refused(tmp_path: Path) -> None:
    """Angles computed in float16 are not reproduced by any cache: left as they are, said why."""
    x, positions = rotary_inputs()
    args = (x.half(), positions)
    model = export(Float16Rotary(torch.float16), args, ["x", "positions"], tmp_path / "m.onnx")
    fused, report = optimize_model(model, "onnx")
    assert "RotaryEmbedding" not in {n.op_type for n in fused.graph.node}
    rotary = next(f for f in report.fusions if f.name == "rotary")
    assert any("FLOAT16, not float32" in reason for reason in rotary.refused), rotary.refused


class RecastRotary(HalfRotary):
    """cos/sin cast to `inner` before they meet x of `dtype`: a rounding no float32 cache cast
    once to x's dtype reproduces."""

    def __init__(self, inner: torch.dtype, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos().to(self.inner)[:, None].to(self.dtype)
        sin = angles.sin().to(self.inner)[:, None].to(self.dtype)
        return x * cos + rotate_half(x) * sin


@pytest.mark.parametrize(
    ("inner", "dtype"),
    [
        (torch.int64, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float64, torch.float64),  # RotaryEmbedding takes no float64
    ],
    ids=["int64", "bf16-in-f16", "f64"],
)
def test_rotary_through_other_casts_is_refused(
    inner: torch.dtype, dtype: torch.dtype, tmp_path: Path
) -> None:
    x, positions = rotary_inputs()
    args = (x.to(dtype), positions)
    model = export(RecastRotary(inner, dtype), args, ["x", "positions"], tmp_path / "m.onnx")
    fused, _ = optimize_model(model, "onnx")
    assert "RotaryEmbedding" not in {n.op_type for n in fused.graph.node}
    far = {"x": args[0].numpy(), "positions": FAR_POSITIONS}
    before, after = run_both(model, fused, far)
    assert np.array_equal(before, after)


class MaskPositionsRotary(HalfRotary):
    """Positions from the attention mask as Hugging Face computes them: left padding gets -1."""

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, attention_mask.cumsum(-1) - 1)


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_rotary_with_left_padded_mask_positions(target: str, tmp_path: Path) -> None:
    """Position -1 is outside RotaryEmbedding's cache: the fused graph must still run, and
    agree on every real token (pad rows are masked out by attention anyway)."""
    x, mask = torch.randn(2, HEADS, 5, HEAD_DIM), torch.ones(2, 5, dtype=torch.int64)
    model = export(MaskPositionsRotary(), (x, mask), ["x", "attention_mask"], tmp_path / "m.onnx")
    fused, _ = optimize_model(model, target)
    assert Counter(n.op_type for n in fused.graph.node)["RotaryEmbedding"] == 1
    left = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    before, after = run_both(model, fused, {"x": x.numpy(), "attention_mask": left})
    real = np.broadcast_to(left.astype(bool)[:, None, :, None], before.shape)
    assert np.abs(before - after)[real].max() <= 1e-4


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_rotary_positions_of_batch_one(target: str, tmp_path: Path) -> None:
    """position_ids [1, seq] (Hugging Face's default) broadcast over a batch of 2."""
    x, positions = torch.randn(2, HEADS, 5, HEAD_DIM), torch.arange(5)[None]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"x": {0: batch, 2: seq}, "positions": {1: seq}}
    names = ["x", "positions"]
    model = export(HalfRotary(), (x, positions), names, tmp_path / "m.onnx", dynamic)
    fused, _ = optimize_model(model, target)
    assert Counter(n.op_type for n in fused.graph.node)["RotaryEmbedding"] == 1
    before, after = run_both(model, fused, {"x": x.numpy(), "positions": positions.numpy()})
    assert np.abs(before - after).max() <= 1e-4


class PairsAsHalvesRotary(InterleavedRotary):
    """The even and odd channels rotated as in the interleaved form, but written back as
    [real..., imag...] (unsqueezed at -2 before the Concat on the last axis): not interleaved."""

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        x1, x2 = x[..., ::2], x[..., 1::2]
        real, imag = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        return torch.cat((real.unsqueeze(-2), imag.unsqueeze(-2)), dim=-1).flatten(-2)


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_rotary_pairs_written_as_halves_is_refused(target: str, tmp_path: Path) -> None:
    model = export(PairsAsHalvesRotary(), rotary_inputs(), ["x", "positions"], tmp_path / "m.onnx")
    fused, report = optimize_model(model, target)
    assert "RotaryEmbedding" not in {n.op_type for n in fused.graph.node}
    rotary = next(f for f in report.fusions if f.name == "rotary")
    assert any("last axis" in reason for reason in rotary.refused), rotary.refused
    x = rotary_inputs()[0].numpy()
    before, after = run_both(model, fused, {"x": x, "positions": FAR_POSITIONS})
    assert np.abs(before - after).max() <= 1e-4


PREFIX = 3  # a prefix-LM's bidirectional prefix


class WhereMaskBlock(GroupedBlock):
    """GroupedBlock masked through a Where: `prefix_lm` attends both ways within the first
    PREFIX positions (Where picks the causal part only outside them: not causal);
    `causal_branches` picks between two masks that are both causal; `additive` turns the
    boolean mask into a bias as transformers does, Where(allowed, 0, lowest)."""

    def __init__(self, form: str) -> None:
        super().__init__(True)
        self.form = form

    def forward(self, x: Tensor, positions: Tensor, attention_mask: Tensor) -> Tensor:
        b, s, _ = x.shape
        scores, v = self.scores(x, positions)
        index = torch.arange(s)
        causal = (index[None, :] <= index[:, None])[None, None]
        padding = (attention_mask > 0)[:, None, None, :]
        in_prefix = ((index[None, :] < PREFIX) & (index[:, None] < PREFIX))[None, None]
        lowest = torch.finfo(scores.dtype).min
        if self.form == "prefix_lm":
            ones = torch.ones(s, s, dtype=torch.int64)[None, None]
            allowed = torch.where(in_prefix, ones, causal.long()).bool() & padding
        elif self.form == "causal_branches":
            # int64 values: onnxruntime has no boolean Where
            picked = torch.where(in_prefix, (causal & padding).long(), causal.long())
            allowed = picked.bool()
        if self.form == "additive":
            bias = torch.where(causal & padding, 0.0, lowest)
            scores = scores + bias
        else:
            scores = scores.masked_fill(~allowed, lowest)
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)


@pytest.mark.parametrize("form", ["prefix_lm", "causal_branches", "additive"])
def test_group_query_attention_through_where(form: str, tmp_path: Path) -> None:
    """Where keeps a causal part only if both of its values hold it (or it re-encodes a causal
    condition as constants): a prefix-LM mask stays Attention, the others fuse."""
    model, fused, x, positions = fused_block(WhereMaskBlock(form), form != "prefix_lm", tmp_path)
    feeds = {"x": x.numpy(), "positions": positions.numpy(), "attention_mask": np.ones((2, 5))}
    feeds["attention_mask"] = feeds["attention_mask"].astype(np.int64)
    before, after = run_both(model, fused, feeds)
    assert np.abs(before - after).max() <= 1e-4
    feeds |= {"positions": FAR_POSITIONS, "attention_mask": LEFT_PADDED}
    assert_real_rows_match(model, fused, feeds, axis=1)


def where_masked_attention(nan_guard: bool) -> onnx.ModelProto:
    """Eager attention masked by Where(Not(mask), -inf, scores), with SDPA's NaN guard
    Where(IsNaN(probs), 0, probs) after the Softmax or without it (hand-built)."""
    shape = [1, 2, 4, 8]
    initializers = [
        numpy_helper.from_array(np.array(0.125, np.float32), "scale"),
        numpy_helper.from_array(np.array(-np.inf, np.float32), "fill"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["raw"]),
        helper.make_node("Mul", ["raw", "scale"], ["scores"]),
        helper.make_node("Not", ["mask"], ["masked_out"]),
        helper.make_node("Where", ["masked_out", "fill", "scores"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    probs = "probs"
    if nan_guard:
        nodes += [
            helper.make_node("IsNaN", ["probs"], ["nan"]),
            helper.make_node("Where", ["nan", "zero", "probs"], ["guarded"]),
        ]
        probs = "guarded"
    nodes.append(helper.make_node("MatMul", [probs, "v"], ["out"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 1, 4, 4]))
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "attention", inputs, [output], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("nan_guard", [False, True], ids=["plain", "nan_guard"])
def test_where_masked_attention(nan_guard: bool) -> None:
    """The NaN guard's 0 and the mask's fill are two values: both forms fuse."""
    model = where_masked_attention(nan_guard)
    fused, report = optimize_model(model, "onnx")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Attention"] == 1 and ops["Softmax"] == ops["IsNaN"] == ops["Where"] == 0, ops
    assert report.applied_by_fusion()["attention"] == 1
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, 2, 4, 8)).astype(np.float32) for n in "qkv"}
    feeds["mask"] = np.tril(np.ones((4, 4), bool))[None, None]
    before, after = run_both(model, fused, feeds)
    assert np.abs(before - after).max() <= 1e-4
