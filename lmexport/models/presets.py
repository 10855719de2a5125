"""Named models with seeded random weights: reproducible sources for tests, README, benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from .hornet import VARIANTS, HorNetConfig, variant_config
from .llama import LlamaConfig

DEFAULT_SEED = 0


@dataclass(frozen=True)
class Preset:
    arch: str
    config: LlamaConfig | HorNetConfig
    about: str


PRESETS: dict[str, Preset] = {
    "llama-tiny": Preset(
        "llama",
        LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            max_position_embeddings=512,
        ),
        "4 layers, hidden 64, 4/2 heads: fast, for tests and the README",
    ),
    "llama-bench": Preset(
        "llama",
        LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            max_position_embeddings=4096,
        ),
        "155M parameters, 8 layers, hidden 1024, 16/4 heads: the speed benchmark model",
    ),
}


# HorNet: every variant of the paper, under the name `--arch` uses for its checkpoints.
PRESETS.update(
    (
        f"hornet-{variant}",
        Preset("hornet", variant_config(variant), "HorNet-" + variant.replace("-", " ", 1)),
    )
    for variant in VARIANTS
)
HORNET_ARCHS = [f"hornet-{variant}" for variant in VARIANTS]


def preset_names() -> list[str]:
    return sorted(PRESETS)
