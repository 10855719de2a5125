"""HorNet in PyTorch: the official parameter names, the paper's sizes, and the export-only forward
(`FastHorNet`) against the eager model on small configs (no ONNX export here)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lmexport import spectral
from lmexport.exporter.fast_hornet import FastHorNet
from lmexport.exporter.hornet import export_hornet
from lmexport.models.hornet import VARIANTS, HorNet, HorNetConfig, init_random, variant_config

# Names and shapes as the official `hornet_tiny_gf` state_dict has them.
OFFICIAL_TINY_GF = {
    "downsample_layers.0.0.weight": [64, 3, 4, 4],
    "downsample_layers.0.1.weight": [64],
    "downsample_layers.1.0.bias": [64],
    "downsample_layers.3.1.weight": [512, 256, 2, 2],
    "stages.0.0.gamma1": [64],
    "stages.0.0.norm1.weight": [64],
    "stages.0.0.gnconv.proj_in.weight": [128, 64, 1, 1],
    "stages.0.0.gnconv.dwconv.weight": [96, 1, 7, 7],
    "stages.0.0.gnconv.dwconv.bias": [96],
    "stages.0.0.gnconv.pws.0.weight": [64, 32, 1, 1],
    "stages.0.0.gnconv.proj_out.weight": [64, 64, 1, 1],
    "stages.0.0.norm2.weight": [64],
    "stages.0.0.pwconv1.weight": [256, 64],
    "stages.0.0.pwconv2.bias": [64],
    "stages.0.0.gamma2": [64],
    "stages.2.0.gnconv.dwconv.complex_weight": [240, 14, 8, 2],
    "stages.2.0.gnconv.dwconv.dw.weight": [240, 1, 3, 3],
    "stages.2.0.gnconv.dwconv.pre_norm.weight": [480],
    "stages.2.17.gnconv.dwconv.post_norm.bias": [480],
    "stages.2.17.gnconv.pws.2.weight": [256, 128, 1, 1],
    "stages.3.1.gnconv.dwconv.complex_weight": [496, 7, 4, 2],
    "stages.3.1.gnconv.pws.3.bias": [512],
    "norm.weight": [512],
    "head.weight": [1000, 512],
}
# The paper's Table 1 (millions of parameters, rounded) and the 384 variants' filter sizes.
PARAMS_M = {"tiny": (22, 23), "small": (50, 50), "base": (87, 88), "large": (195, 196)}


def test_official_names_and_shapes() -> None:
    with torch.device("meta"):
        state = HorNet(variant_config("tiny-gf")).state_dict()
    assert {k: list(state[k].shape) for k in OFFICIAL_TINY_GF} == OFFICIAL_TINY_GF
    assert len(state) == 640  # no buffers, nothing extra: official checkpoints load strictly


@pytest.mark.parametrize("size", sorted(PARAMS_M))
def test_paper_sizes(size: str) -> None:
    counts = []
    for mixer in ("7x7", "gf"):
        with torch.device("meta"):
            model = HorNet(variant_config(f"{size}-{mixer}"))
        counts.append(round(sum(p.numel() for p in model.parameters()) / 1e6))
    assert tuple(counts) == PARAMS_M[size]
    assert variant_config(f"{size}-gf-384").gf_sizes == [None, None, [24, 13], [12, 7]]
    assert variant_config(f"{size}-gf").gf_sizes == [None, None, [14, 8], [7, 4]]


def test_variants() -> None:
    assert len(VARIANTS) == 12
    with pytest.raises(ValueError, match="tiny-gf"):
        variant_config("tiny-5x5")


@pytest.mark.parametrize("height,width", [(14, 14), (7, 7), (12, 12), (5, 6), (6, 5)])
def test_spectral_matrices(height: int, width: int) -> None:
    """The five MatMul steps reproduce rfft2 → product → irfft2 for any complex weight, including
    the imaginary parts irfft ignores."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, height, width, 3))
    shape = (3, height, width // 2 + 1)
    weight = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    ref = torch.fft.irfft2(
        torch.fft.rfft2(torch.from_numpy(x), dim=(1, 2), norm="ortho")
        * torch.from_numpy(weight.transpose(1, 2, 0)),
        s=(height, width),
        dim=(1, 2),
        norm="ortho",
    ).numpy()
    freq = width // 2 + 1
    rows = (spectral.row_dft(width) @ x).reshape(2, 2 * height, freq * 3)
    blocks = (spectral.column_dft(height) @ rows) * spectral.filter_weight(weight).reshape(
        4 * height, -1
    )
    inverse = (spectral.column_idft(height) @ blocks).reshape(2, height, 2 * freq, 3)
    assert np.abs(spectral.row_idft(width) @ inverse - ref).max() < 1e-12


SMALL = HorNetConfig(
    variant="test",
    dims=[8, 16, 32, 64],
    depths=[1, 1, 2, 1],
    gf_sizes=[None, None, [4, 3], [2, 2]],  # filters for 64x64 inputs
    num_classes=10,
)


@pytest.mark.parametrize("image_size", [64, 96, 80])
def test_fast_forward_matches_eager(image_size: int) -> None:
    """At 64 the filters fit; at 96 and 80 both resize them (bilinear, corners aligned)."""
    model = HorNet(SMALL).eval()
    init_random(model, 3)
    x = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        ref, got = model(x), FastHorNet(model, image_size)(x)
    assert (ref - got).abs().max() < 1e-4
    assert ref.std() > 1.0  # init_random spreads the logits


def test_fast_7x7_takes_any_size() -> None:
    model = HorNet(HorNetConfig(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_classes=10))
    init_random(model.eval(), 4)
    fast = FastHorNet(model, None)
    for shape in [(2, 3, 64, 64), (1, 3, 96, 40)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert (model(x) - fast(x)).abs().max() < 1e-4


def test_7x7_exported_below_the_traced_minimum() -> None:
    """--image-size 48 is accepted (at least 32), but torch.export wants maps of 2x2 at the last
    stage: the 7x7 graph (any size) is traced at 64 and runs at 48 with the eager logits."""
    model = HorNet(HorNetConfig(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_classes=10))
    init_random(model.eval(), 5)
    proto = export_hornet(model, "ort", 48)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session.run(None, {"pixel_values": x.numpy()})[0] - ref).max() < 1e-4
