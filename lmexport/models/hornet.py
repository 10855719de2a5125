"""HorNet (Rao et al., "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated
Convolutions", arXiv 2207.14284), the gnConv image classifiers, written for export.

Module and parameter names follow the official release (`raoyongming/HorNet`, `hornet.py`), so its
checkpoints load by name: `downsample_layers.0.0.weight`, `stages.2.0.gnconv.dwconv.complex_weight`,
`stages.3.1.gamma2`, `head.bias`. Drop path is a training-only regulariser and is left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def gf_sizes_for(image_size: int) -> list[list[int] | None]:
    """Per stage, the filter size (h, w of `complex_weight`) of the GF variants: stages 3 and 4,
    sized for the rfft2 of their feature maps at `image_size` (image_size / 16 and / 32 wide)."""
    sizes: list[list[int] | None] = [None, None]
    for stride in (16, 32):
        side = image_size // stride
        sizes.append([side, side // 2 + 1])
    return sizes


@dataclass
class HorNetConfig:
    variant: str = "tiny-7x7"
    dims: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    depths: list[int] = field(default_factory=lambda: [2, 3, 18, 2])
    orders: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    # Per stage: None for the 7x7 depthwise conv, else [h, w] of the global filter's weight.
    gf_sizes: list[list[int] | None] = field(default_factory=lambda: [None] * 4)
    scale: float = 1.0 / 3.0  # gnConv's `s`
    num_classes: int = 1000
    in_chans: int = 3

    @property
    def global_filter(self) -> bool:
        return any(size is not None for size in self.gf_sizes)

    @property
    def native_size(self) -> int:
        """The input size whose feature maps match the filter sizes (224 for 7x7 models)."""
        stage3 = self.gf_sizes[2]
        return 224 if stage3 is None else 16 * stage3[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BASE_DIMS = {"tiny": 64, "small": 96, "base": 128, "large": 192}
# The official release has 384 variants of the base and large GF models; the filter sizes follow
# the input size, so tiny and small get them too.
VARIANTS = [
    *(f"{size}-{mixer}" for size in BASE_DIMS for mixer in ("7x7", "gf")),
    *(f"{size}-gf-384" for size in BASE_DIMS),
]


def variant_config(variant: str, num_classes: int = 1000) -> HorNetConfig:
    """The paper's variants: `tiny|small|base|large` - `7x7|gf`, and `gf-384` for 384 inputs.
    `num_classes`: 1000 for ImageNet-1K; the official HorNet-L checkpoints are ImageNet-22K
    (21841)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown HorNet variant {variant!r} (choose from {', '.join(VARIANTS)})")
    size, mixer, *image = variant.split("-")
    base_dim = BASE_DIMS[size]
    image_size = int(image[0]) if image else 224
    return HorNetConfig(
        variant=variant,
        dims=[base_dim * 2**i for i in range(4)],
        gf_sizes=gf_sizes_for(image_size) if mixer == "gf" else [None] * 4,
        num_classes=num_classes,
    )


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of [batch, channels, height, width] tensors."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def resize_filter(weight: Tensor, h: int, w: int) -> Tensor:
    """The `complex_weight` [channels, h0, w0, 2] for another spectrum size, as the official model
    does it when the input size differs from the one it was built for: bilinear, corners aligned."""
    if tuple(weight.shape[1:3]) == (h, w):
        return weight
    planes = weight.permute(3, 0, 1, 2)
    return F.interpolate(planes, size=(h, w), mode="bilinear", align_corners=True).permute(
        1, 2, 3, 0
    )


class GlobalLocalFilter(nn.Module):
    """Half the channels through a 3x3 depthwise conv, half through a learned filter in the
    frequency domain (rfft2 → complex product → irfft2), interleaved again."""

    def __init__(self, dim: int, h: int, w: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, 3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.zeros(dim // 2, h, w, 2))
        self.pre_norm = LayerNorm(dim)
        self.post_norm = LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre_norm(x)
        x1, x2 = torch.chunk(x, 2, dim=1)
        x1 = self.dw(x1)
        b, c, height, width = x2.shape
        spectrum = torch.fft.rfft2(x2.float(), dim=(2, 3), norm="ortho")
        weight = resize_filter(self.complex_weight, spectrum.shape[2], spectrum.shape[3])
        spectrum = spectrum * torch.view_as_complex(weight.contiguous())
        x2 = torch.fft.irfft2(spectrum, s=(height, width), dim=(2, 3), norm="ortho")
        x = torch.stack([x1, x2], dim=2).reshape(b, 2 * c, height, width)
        return self.post_norm(x)


class GnConv(nn.Module):
    """Recursive gated convolution of order n: one projection splits into a gate and n spatially
    mixed branches of doubling width; each order multiplies the running product by a branch."""

    def __init__(self, dim: int, order: int, scale: float, gf_size: list[int] | None) -> None:
        super().__init__()
        self.dims = [dim // 2**i for i in reversed(range(order))]
        self.scale = scale
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        total = sum(self.dims)
        self.dwconv: nn.Module
        if gf_size is None:
            self.dwconv = nn.Conv2d(total, total, 7, padding=3, groups=total)
        else:
            self.dwconv = GlobalLocalFilter(total, *gf_size)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList(
            nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        gate, branches = torch.split(self.proj_in(x), [self.dims[0], sum(self.dims)], dim=1)
        mixed = torch.split(self.dwconv(branches) * self.scale, self.dims, dim=1)
        x = gate * mixed[0]
        for pw, branch in zip(self.pws, mixed[1:], strict=True):
            x = pw(x) * branch
        return self.proj_out(x)


class Block(nn.Module):
    """gnConv and an MLP, each pre-normed, scaled per channel (layer scale) and added back."""

    def __init__(self, dim: int, order: int, scale: float, gf_size: list[int] | None) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.gnconv = GnConv(dim, order, scale, gf_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), 1e-6))
        self.gamma2 = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.gamma1[:, None, None] * self.gnconv(self.norm1(x))
        h = x.permute(0, 2, 3, 1)  # the MLP runs channels-last, as Linear layers
        h = self.gamma2 * self.pwconv2(self.act(self.pwconv1(self.norm2(h))))
        return x + h.permute(0, 3, 1, 2)


class HorNet(nn.Module):
    def __init__(self, config: HorNetConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        stem = nn.Sequential(nn.Conv2d(config.in_chans, dims[0], 4, stride=4), LayerNorm(dims[0]))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    Block(dims[i], config.orders[i], config.scale, config.gf_sizes[i])
                    for _ in range(config.depths[i])
                )
            )
            for i in range(4)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], config.num_classes)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Logits [batch, num_classes] of images [batch, 3, height, width]."""
        x = pixel_values
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((-2, -1))))


def init_random(model: HorNet, seed: int) -> None:
    """Seeded weights for presets and tests. Unlike the official init (layer scale 1e-6, which
    makes every block nearly the identity) each block contributes, and the logits spread over
    several units, so a parity test exercises every weight and top-1 is unambiguous."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma1", "gamma2"):
                p.copy_(0.3 + 0.1 * randn(p.shape))
            elif leaf == "complex_weight":
                p.copy_(0.7 * randn(p.shape))
            elif p.ndim == 1 and leaf == "weight":  # norms
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif leaf == "bias":
                p.copy_(0.02 * randn(p.shape))
            else:
                fan_in = math.prod(p.shape[1:])
                gain = 3.0 if name.startswith("head.") else 1.0
                p.copy_(gain * randn(p.shape) / math.sqrt(fan_in))
