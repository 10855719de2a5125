"""HorNet's forward rewritten for onnxruntime, for export only (`ort` and `onnx` targets).

`FastHorNet` copies an eager `HorNet`'s weights and computes the same logits with a graph that
onnxruntime runs faster (measured with `benchmarks/hornet.py`):
- channels-last tokens [batch·height·width, channels] between blocks, so every norm is one
  `LayerNormalization` and every pointwise conv a `Gemm` with its bias; the depthwise convs
  transpose around themselves, which onnxruntime turns into its blocked-layout reorders;
- the global filter as real DFT matrices (`lmexport.spectral`) for the one input size it is
  exported for, the weight resized first as the eager model does;
- layer scale (`gamma1`, `gamma2`) and gnConv's `s` folded into the weights before them, and
  gnConv's input projection split in two (gate, branches) instead of slicing its output.
Weights keep their block's name (`stages.2.5.…`), which `repeat.py` relies on.
"""

from __future__ import annotations

from copy import deepcopy
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from .. import spectral
from ..models.hornet import Block, GlobalLocalFilter, GnConv, HorNet, LayerNorm, resize_filter

EPS = 1e-6


def _linear(layer: nn.Module, scale: Tensor | float = 1.0, rows: slice = slice(None)) -> nn.Linear:
    """A Linear layer of a Linear or 1x1 conv `layer` (its output `rows`), scaled per channel."""
    assert isinstance(layer, nn.Linear | nn.Conv2d) and layer.bias is not None
    weight, bias = layer.weight.detach().flatten(1)[rows], layer.bias.detach()[rows]
    if isinstance(scale, Tensor):
        weight, bias = weight * scale.detach()[:, None], bias * scale.detach()
    else:
        weight, bias = weight * scale, bias * scale
    copy = nn.Linear(weight.shape[1], weight.shape[0])
    copy.weight.data, copy.bias.data = weight.contiguous(), bias.contiguous()
    return copy


def _norm(norm: nn.Module, scale: float = 1.0) -> nn.LayerNorm:
    """A channels-last LayerNorm of `norm`'s weights, its output scaled by `scale`."""
    assert isinstance(norm, LayerNorm | nn.LayerNorm) and norm.bias is not None
    layer = nn.LayerNorm(norm.weight.shape[0], eps=EPS)
    layer.weight.data = norm.weight.detach() * scale
    layer.bias.data = norm.bias.detach() * scale
    return layer


def _conv(conv: nn.Module, scale: float = 1.0) -> nn.Conv2d:
    """A copy of `conv`, its output scaled by `scale`."""
    assert isinstance(conv, nn.Conv2d)
    copy = deepcopy(conv)
    with torch.no_grad():
        copy.weight.mul_(scale)
        if copy.bias is not None:
            copy.bias.mul_(scale)
    return copy


def _channels_first(conv: nn.Conv2d, x: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """`conv` (same size out) on tokens [batch·height·width, channels]."""
    b, h, w = shape
    out = conv(x.reshape(b, h, w, -1).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).reshape(b * h * w, -1)


class FastGlobalFilter(nn.Module):
    """`GlobalLocalFilter` with the gnConv scale in its post-norm and the DFTs as MatMuls."""

    row_dft: Tensor
    column_dft: Tensor
    weight: Tensor
    column_idft: Tensor
    row_idft: Tensor

    def __init__(self, gf: GlobalLocalFilter, scale: float, height: int, width: int) -> None:
        super().__init__()
        self.pre_norm = _norm(gf.pre_norm)
        self.dw = _conv(gf.dw)
        self.post_norm = _norm(gf.post_norm, scale)
        freq = width // 2 + 1
        weight = resize_filter(gf.complex_weight.detach(), height, freq).double()
        spectrum = torch.view_as_complex(weight.contiguous()).numpy()
        for name, matrix in (
            ("row_dft", spectral.row_dft(width)),
            ("column_dft", spectral.column_dft(height)),
            ("weight", spectral.filter_weight(spectrum).reshape(4 * height, -1)),
            ("column_idft", spectral.column_idft(height)),
            ("row_idft", spectral.row_idft(width)),
        ):
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(matrix)).float())

    def forward(self, x: Tensor, shape: tuple[int, int, int]) -> Tensor:
        b, h, w = shape
        c = x.shape[-1]
        local, spatial = torch.chunk(self.pre_norm(x), 2, dim=-1)
        local = _channels_first(self.dw, local, shape)
        rows = (self.row_dft @ spatial.reshape(b, h, w, c // 2)).reshape(b, 2 * h, -1)
        blocks = (self.column_dft @ rows) * self.weight
        inverse = (self.column_idft @ blocks).reshape(b, h, -1, c // 2)
        spatial = (self.row_idft @ inverse).reshape(b * h * w, c // 2)
        return self.post_norm(torch.stack([local, spatial], dim=-1).reshape(b * h * w, c))


class FastGnConv(nn.Module):
    def __init__(self, gn: GnConv, gamma: Tensor, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.dims = gn.dims
        self.proj_gate = _linear(gn.proj_in, rows=slice(None, self.dims[0]))
        self.proj_branches = _linear(gn.proj_in, rows=slice(self.dims[0], None))
        self.dwconv: nn.Conv2d | FastGlobalFilter
        if isinstance(gn.dwconv, GlobalLocalFilter):
            if size is None:
                raise ValueError("a global filter is exported for one input size")
            self.dwconv = FastGlobalFilter(gn.dwconv, gn.scale, *size)
        else:
            self.dwconv = _conv(gn.dwconv, gn.scale)
        self.pws = nn.ModuleList(_linear(pw) for pw in gn.pws)
        self.proj_out = _linear(gn.proj_out, gamma)

    def forward(self, x: Tensor, shape: tuple[int, int, int]) -> Tensor:
        gate, branches = self.proj_gate(x), self.proj_branches(x)
        if isinstance(self.dwconv, FastGlobalFilter):
            branches = self.dwconv(branches, shape)
        else:
            branches = _channels_first(self.dwconv, branches, shape)
        mixed = torch.split(branches, self.dims, dim=-1)
        x = gate * mixed[0]
        for pw, branch in zip(self.pws, mixed[1:], strict=True):
            x = pw(x) * branch
        return self.proj_out(x)


class FastBlock(nn.Module):
    def __init__(self, block: Block, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.norm1 = _norm(block.norm1)
        self.gnconv = FastGnConv(block.gnconv, block.gamma1, size)
        self.norm2 = _norm(block.norm2)
        self.pwconv1 = _linear(block.pwconv1)
        self.act = nn.GELU()
        self.pwconv2 = _linear(block.pwconv2, block.gamma2)

    def forward(self, x: Tensor, shape: tuple[int, int, int]) -> Tensor:
        x = x + self.gnconv(self.norm1(x), shape)
        return x + self.pwconv2(self.act(self.pwconv1(self.norm2(x))))


class FastHorNet(nn.Module):
    """`image_size` fixes the input size the global filters are built for (None: 7x7 models,
    any size)."""

    def __init__(self, model: HorNet, image_size: int | None) -> None:
        super().__init__()
        if model.config.global_filter and image_size is None:
            raise ValueError("a global-filter HorNet is exported for one input size")
        layers = [cast(nn.Sequential, layer) for layer in model.downsample_layers]
        self.stem = _conv(layers[0][0])
        self.stem_norm = _norm(layers[0][1])
        self.downsample_norms = nn.ModuleList(_norm(layer[0]) for layer in layers[1:])
        self.downsample_convs = nn.ModuleList(_conv(layer[1]) for layer in layers[1:])
        self.stages = nn.ModuleList()
        for i, stage in enumerate(model.stages):
            side = None if image_size is None else image_size // 4 // 2**i
            size = None if side is None else (side, side)
            blocks = cast(nn.Sequential, stage)
            self.stages.append(nn.ModuleList(FastBlock(cast(Block, b), size) for b in blocks))
        self.norm = _norm(model.norm)
        self.head = _linear(model.head)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.stem_norm(self.stem(pixel_values).permute(0, 2, 3, 1))
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsample_norms[i - 1](x).permute(0, 3, 1, 2)
                x = self.downsample_convs[i - 1](x).permute(0, 2, 3, 1)
            b, h, w, c = x.shape
            tokens = x.reshape(b * h * w, c)
            for block in cast(nn.ModuleList, stage):
                tokens = block(tokens, (b, h, w))
            x = tokens.reshape(b, h, w, c)
        return self.head(self.norm(x.mean((1, 2))))
