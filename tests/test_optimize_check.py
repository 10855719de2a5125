"""`optimize`'s own parity check must catch a fusion that is wrong only where masks of ones and
the first positions do not reach: a dropped padding mask, a rotary cache wrong past its first
rows. Each case breaks a correct fused graph by hand and expects check_same to see it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import Tensor, nn

import lmexport
from lmexport.optimizers import optimize_model
from lmexport.optimizers.check import check_same

HEADS, HEAD_DIM = 2, 16


@pytest.fixture(scope="module")
def plain_graph(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    folder = lmexport.convert("llama-tiny", tmp_path_factory.mktemp("plain") / "m", target="plain")
    return onnx.load(str(folder / "model.onnx"))


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_dropped_padding_mask_is_caught(plain_graph: onnx.ModelProto, target: str) -> None:
    fused, _ = optimize_model(plain_graph, target)
    assert check_same(plain_graph, fused) <= 1e-4
    # Attention without its mask input stays causal (GroupQueryAttention always is; Attention
    # keeps is_causal): only a padded key tells the broken graph from the right one.
    dropped = 0
    for node in fused.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[10] = ""  # attention_bias
            dropped += 1
        elif node.op_type == "Attention" and len(node.input) > 3 and node.input[3]:
            node.input[3] = ""  # attn_mask
            node.attribute.append(onnx.helper.make_attribute("is_causal", 1))
            dropped += 1
    assert dropped
    assert check_same(plain_graph, fused) > 1e-2


class ComputedRotary(nn.Module):
    """cos/sin computed from positions, as transformers' Llama does: no table to bound them."""

    def __init__(self) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rotary_cache_past_the_first_rows_is_checked(tmp_path: Path) -> None:
    x, positions = torch.randn(2, HEADS, 5, HEAD_DIM), torch.arange(5).repeat(2, 1)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            ComputedRotary(),
            (x, positions),
            dynamo=True,
            input_names=["x", "positions"],
            dynamic_shapes={"x": {0: batch, 2: sequence}, "positions": {0: batch, 1: sequence}},
            verbose=False,
        )
    assert program is not None
    program.save(str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))
    fused, _ = optimize_model(model, "onnx")
    rotary = next(n for n in fused.graph.node if n.op_type == "RotaryEmbedding")
    assert check_same(model, fused) <= 1e-5
    tables = {t.name: t for t in fused.graph.initializer}
    for name in rotary.input:
        if name in tables and "cos" in name:
            cos = numpy_helper.to_array(tables[name]).copy()
            cos[64:] = 0.0  # every row a position of 64 or more reads
            tables[name].CopyFrom(numpy_helper.from_array(cos, name))
            break
    else:
        raise AssertionError(f"no cos cache among {list(rotary.input)}")
    assert check_same(model, fused) > 1e-2
