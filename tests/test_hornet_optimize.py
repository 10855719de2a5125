"""`lmexport optimize` on global-filter graphs exported elsewhere: DFTs → MatMuls, with parity."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lmexport.optimizers.hornet_pipeline import is_image_model

from helpers import run


class GlobalFilter(nn.Module):
    """A global filter as GFNet- and HorNet-style code writes it, independent of lmexport's."""

    def __init__(self, channels: int, h: int, w: int, squared: bool = False) -> None:
        super().__init__()
        self.complex_weight = nn.Parameter(0.7 * torch.randn(channels, h, w, 2))
        self.squared = squared

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        spectrum = torch.fft.rfft2(x, dim=(2, 3), norm="ortho")
        weight = self.complex_weight
        if weight.shape[1:3] != spectrum.shape[2:4]:
            planes = weight.permute(3, 0, 1, 2)
            weight = F.interpolate(
                planes, size=spectrum.shape[2:4], mode="bilinear", align_corners=True
            ).permute(1, 2, 3, 0)
        spectrum = spectrum * torch.view_as_complex(weight.contiguous())
        if self.squared:  # not linear: must be refused
            spectrum = spectrum * spectrum
        return torch.fft.irfft2(spectrum, s=(height, width), dim=(2, 3), norm="ortho")


class Net(nn.Module):
    def __init__(self, squared: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.gf1 = GlobalFilter(16, 8, 5)  # built for 8x8 maps, run at 16x16: weight resized
        self.down = nn.Conv2d(16, 32, 2, stride=2)
        self.gf2 = GlobalFilter(32, 8, 5, squared)  # 8x8 maps, even width: a Nyquist column
        self.head = nn.Linear(32, 10)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)
        x = x + F.gelu(self.gf1(x))
        x = self.down(x)
        x = x + self.gf2(x)
        return self.head(x.mean((2, 3)))


def export(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (torch.randn(2, 3, 64, 64),),
            dynamo=True,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    return path


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(Net(), tmp_path_factory.mktemp("foreign") / "gf.onnx")


def test_dfts_become_matmuls(foreign: Path, tmp_path: Path) -> None:
    assert ops(foreign)["DFT"] == 8
    out = tmp_path / "fast.onnx"
    code, text, err = run("optimize", str(foreign), "-o", str(out), "--report", str(tmp_path / "r"))
    assert code == 0, err
    assert "global_filter  applied 2  refused 0" in text, text
    report = json.loads((tmp_path / "r").read_text())
    assert report["max_diff"] <= 1e-4
    assert ops(out)["DFT"] == 0 and ops(out)["MatMul"] == 8
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    before, after = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
        for p in (foreign, out)
    )
    assert np.abs(before - after).max() <= 1e-4 * max(1.0, float(np.abs(before).max()))


def test_nonlinear_spectrum_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = export(Net(squared=True), tmp_path / "squared.onnx")
    out = tmp_path / "out.onnx"
    code, text, err = run("optimize", str(src), "-o", str(out), "-v")
    assert code == 0, err
    assert "global_filter  applied 1  refused 1" in text, text
    assert "not a per-channel circular convolution" in text
    assert ops(out)["DFT"] == 4


class BiasedAttention(nn.Module):
    """Attention with an additive bias: every input is a float rank-4 tensor, not an image."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        return ((q @ k.transpose(2, 3)) * 0.25 + bias).softmax(-1) @ v


def test_attention_graph_is_not_an_image(foreign: Path, tmp_path: Path) -> None:
    """Only a graph with convolutions over one grey or colour image takes this pipeline: an
    attention graph whose inputs are all [batch, heads, seq, head_dim] gets the Llama fusions."""
    q, k, v = (torch.randn(2, 4, 5, 16) for _ in range(3))
    bias = torch.randn(2, 4, 5, 5)
    src = tmp_path / "attention.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            BiasedAttention(), (q, k, v, bias), dynamo=True, input_names=["q", "k", "v", "bias"]
        )
    assert program is not None
    program.save(str(src))
    assert is_image_model(onnx.load(str(foreign)))
    assert not is_image_model(onnx.load(str(src)))
    out = tmp_path / "out.onnx"
    code, text, err = run("optimize", str(src), "-o", str(out), "--target", "onnx")
    assert code == 0, err
    assert ops(out)["Attention"] == 1, text
