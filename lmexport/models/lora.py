"""PEFT-format LoRA adapters, merged into the base weights before export.

A LoRA module adds scale · B·A to a frozen linear weight W ([out, in]; A is [r, in], B [out, r]),
with scale = lora_alpha / r, or lora_alpha / √r with rsLoRA. Merging W' = W + scale · B·A gives a
plain model whose every output equals the adapted model's, so the export needs nothing of LoRA.

The adapter folder is what PEFT's `save_pretrained` (and torchtune's PEFT output) writes:
`adapter_config.json` and `adapter_model.safetensors`, tensors named
`base_model.model.<module>.lora_A.weight` after the module names of Hugging Face's
`LlamaForCausalLM`, which are ours. Q and K are in Hugging Face's rotate-half row order, which is
also the order a Meta checkpoint's wq/wk have after loading. Variants that merge differently (DoRA,
trained biases, per-module ranks) are refused rather than merged wrongly.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..errors import SourceError
from .checkpoints.hf import read_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# Settings whose non-default values change what a merge must compute.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
}


@dataclass
class Adapter:
    folder: Path
    rank: int
    alpha: float
    rslora: bool
    target_modules: list[str] | str
    sha256: str  # of adapter_model.safetensors

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def record(self) -> dict[str, Any]:
        """What `lmexport.json` keeps of the adapter, so `verify` merges the same one."""
        return {
            "path": str(self.folder.resolve()),
            "sha256": self.sha256,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.rslora,
            "target_modules": self.target_modules,
        }


def read_config(folder: Path) -> Adapter:
    path = folder / CONFIG
    if not folder.is_dir():
        raise SourceError(f"{folder}: --adapter must be a folder ({CONFIG}, {WEIGHTS})")
    if not path.is_file():
        raise SourceError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)")
    raw = read_json(path)
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in raw]
    if missing:
        raise SourceError(f"{path}: missing keys {', '.join(missing)}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise SourceError(f"{path}: peft_type {raw['peft_type']!r} is not LoRA")
    for key, defaults in UNSUPPORTED.items():
        if raw.get(key) not in defaults:
            raise SourceError(f"{path}: {key} = {raw[key]!r} is not supported for merging")
    rank, alpha, targets = raw["r"], raw["lora_alpha"], raw["target_modules"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise SourceError(f"{path}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise SourceError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    if not isinstance(targets, str) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise SourceError(f"{path}: target_modules must be a module name list or a regex")
    return Adapter(
        folder, rank, float(alpha), bool(raw.get("use_rslora", False)), targets, _sha256(folder)
    )


def _sha256(folder: Path) -> str:
    path = folder / WEIGHTS
    if not path.is_file():
        found = " (found adapter_model.bin: only safetensors are read)"
        raise SourceError(
            f"{folder}: no {WEIGHTS}{found if (folder / 'adapter_model.bin').exists() else ''}"
        )
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex must match the whole module name, a list entry its last parts;
    "all-linear" is every linear layer but the output head."""
    if targets == "all-linear":
        return name != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _check_targets(adapter: Adapter, linears: dict[str, nn.Linear]) -> None:
    """Every module the config names must exist: an adapter trained on another architecture
    would otherwise merge partly and silently."""
    path = adapter.folder / CONFIG
    if isinstance(adapter.target_modules, list):
        absent = [t for t in adapter.target_modules if not any(is_target(n, [t]) for n in linears)]
        if absent:
            raise SourceError(
                f"{path}: target_modules names {', '.join(map(repr, absent))}, "
                "which the model does not have"
            )
    elif not any(is_target(n, adapter.target_modules) for n in linears):
        raise SourceError(
            f"{path}: target_modules {adapter.target_modules!r} matches no module of the model"
        )


def _read_pairs(adapter: Adapter, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """(A, B) per module, every name and shape checked (from the header) before data is read."""
    linears = _linears(model)
    _check_targets(adapter, linears)
    path = adapter.folder / WEIGHTS
    pairs: dict[str, dict[str, Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                m = KEY.fullmatch(key)
                if m is None:
                    raise SourceError(
                        f"{WEIGHTS}: unexpected tensor {key!r} (only lora_A/lora_B weights merge)"
                    )
                module, side = m[1], m[2]
                linear = linears.get(module)
                if linear is None:
                    raise SourceError(
                        f"{WEIGHTS}: tensor {key!r} targets {module!r}, "
                        "which the model does not have"
                    )
                if not is_target(module, adapter.target_modules):
                    raise SourceError(
                        f"{WEIGHTS}: tensor {key!r} is for {module!r}, "
                        f"which target_modules {adapter.target_modules!r} does not name"
                    )
                shape = list(f.get_slice(key).get_shape())
                want = (
                    [adapter.rank, linear.in_features]
                    if side == "A"
                    else [linear.out_features, adapter.rank]
                )
                if shape != want:
                    raise SourceError(
                        f"{WEIGHTS}: tensor {key!r} has shape {shape}, the base model "
                        f"and r={adapter.rank} need {want}"
                    )
                pairs.setdefault(module, {})[side] = f.get_tensor(key)
    except SafetensorError as e:
        raise SourceError(f"{path}: unreadable safetensors file ({e})") from None
    except OSError as e:
        raise SourceError(f"{path}: {e}") from None
    if not pairs:
        raise SourceError(f"{path}: holds no LoRA tensors")
    for module, sides in pairs.items():
        if len(sides) != 2:
            lacking = "B" if "A" in sides else "A"
            raise SourceError(f"{WEIGHTS}: {module!r} has no lora_{lacking} tensor")
    return {module: (sides["A"], sides["B"]) for module, sides in sorted(pairs.items())}


def merge_adapter(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Fold the adapter in `folder` into `model`'s weights; returns its `lmexport.json` record."""
    adapter = read_config(folder)
    pairs = _read_pairs(adapter, model)
    linears = _linears(model)
    params = model.named_parameters(remove_duplicate=False)
    if "lm_head" in pairs and any(
        p is linears["lm_head"].weight for n, p in params if n != "lm_head.weight"
    ):
        raise SourceError(
            f"{folder}: adapts lm_head, which shares its weight with the embedding; merging "
            "would change the embedding too"
        )
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            weight = linears[module].weight
            delta = (b.double() @ a.double()) * adapter.scale
            weight.copy_((weight.double() + delta).to(weight.dtype))
    return {**adapter.record(), "modules": len(pairs)}
