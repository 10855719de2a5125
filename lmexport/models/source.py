"""Turn a SOURCE argument (preset name or model folder) into a PyTorch model ready to export."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SourceError
from .checkpoints import hf
from .llama import Llama, init_random
from .presets import DEFAULT_SEED, PRESETS, preset_names


@dataclass
class LoadedModel:
    arch: str
    model: Llama
    source: str  # preset name, or the folder's absolute path
    seed: int | None  # presets only
    tokenizer_files: list[Path] = field(default_factory=list)

    def source_record(self) -> dict[str, object]:
        """What `lmexport.json` keeps so `verify` can rebuild exactly this model."""
        kind = "preset" if self.source in PRESETS else "folder"
        return {
            "kind": kind,
            "name" if kind == "preset" else "path": self.source,
            "seed": self.seed,
            "weights_sha256": weights_sha256(self.model),
        }


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every weight, in name order, so a changed source is noticed by `verify`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_source(source: str, seed: int | None = None) -> LoadedModel:
    if source in PRESETS:
        preset = PRESETS[source]
        seed = DEFAULT_SEED if seed is None else seed
        model = Llama(preset.config)
        init_random(model, seed)
        return LoadedModel(preset.arch, model.eval(), source, seed)
    path = Path(source)
    if not path.exists():
        raise SourceError(
            f"{source}: no such file or folder, and not a preset "
            f"(presets: {', '.join(preset_names())})"
        )
    if not path.is_dir():
        raise SourceError(f"{source}: expected a model folder with config.json")
    config = hf.read_config(path)
    model = Llama(config)
    hf.load_weights(path, model)
    return LoadedModel("llama", model.eval(), str(path.resolve()), None, hf.tokenizer_files(path))
