"""Turn a SOURCE argument (preset name, model folder or HorNet checkpoint file with its `--arch`)
into a PyTorch model ready to export."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SourceError
from . import hornet, lora
from .checkpoints import gguf, hf, meta
from .checkpoints import hornet as hornet_checkpoint
from .checkpoints.lazy import open_checkpoint
from .installed import INSTALLED, installed_path
from .llama import Llama, LlamaConfig, init_random
from .presets import DEFAULT_SEED, HORNET_ARCHS, PRESETS, preset_names


@dataclass
class LoadedModel:
    arch: str
    model: Llama | hornet.HorNet
    source: str  # preset name, or the folder's or checkpoint's absolute path
    seed: int | None  # presets only
    tokenizer_files: list[Path] = field(default_factory=list)
    tokenizer_texts: dict[str, str] = field(default_factory=dict)  # files made from the source
    checkpoint_arch: str | None = None  # the `--arch` of a checkpoint file
    adapter: dict[str, object] | None = None  # the LoRA adapter merged in, if any

    def source_record(self) -> dict[str, object]:
        """What `lmexport.json` keeps so `verify` can rebuild exactly this model."""
        if self.source in PRESETS:
            kind = "preset"
        else:
            kind = "folder" if self.checkpoint_arch is None else "checkpoint"
        record: dict[str, object] = {
            "kind": kind,
            "name" if kind == "preset" else "path": self.source,
            "seed": self.seed,
        }
        if self.checkpoint_arch is not None:
            record["arch"] = self.checkpoint_arch
        if self.adapter is not None:
            record["adapter"] = self.adapter
        return {**record, "weights_sha256": weights_sha256(self.model)}


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every weight, in name order, so a changed source is noticed by `verify`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_source(
    source: str,
    seed: int | None = None,
    arch: str | None = None,
    adapter: str | Path | None = None,
) -> LoadedModel:
    """`arch` names the architecture of a checkpoint file (`hornet-tiny-gf`, ...); `adapter` is
    a PEFT LoRA folder merged into a Llama's weights."""
    loaded = _load_base(source, seed, arch)
    if adapter is not None:
        if not isinstance(loaded.model, Llama):
            raise SourceError("--adapter applies to Llama-family models only")
        loaded.adapter = lora.merge_adapter(loaded.model, Path(adapter))
    return loaded


def is_checkpoint_file(source: str) -> bool:
    """A file whose architecture `--arch` must name (a HorNet `.pth`): not a preset, an
    installed model, a GGUF file or a folder."""
    path = Path(source)
    return (
        source not in PRESETS
        and source not in INSTALLED
        and path.is_file()
        and path.suffix != ".gguf"
    )


def _load_base(source: str, seed: int | None, arch: str | None) -> LoadedModel:
    if arch is not None and arch not in HORNET_ARCHS:
        raise SourceError(f"unknown --arch {arch!r} (choose from {', '.join(HORNET_ARCHS)})")
    if source in INSTALLED:
        source = str(installed_path(source))
    if source in PRESETS:
        if arch is not None:
            raise SourceError(f"--arch is for checkpoint files; preset {source} names its own")
        preset = PRESETS[source]
        seed = DEFAULT_SEED if seed is None else seed
        model: Llama | hornet.HorNet
        if isinstance(preset.config, LlamaConfig):
            model = Llama(preset.config)
            init_random(model, seed)
        else:
            model = hornet.HorNet(preset.config)
            hornet.init_random(model, seed)
        return LoadedModel(preset.arch, model.eval(), source, seed)
    path = Path(source)
    if not path.exists():
        raise SourceError(
            f"{source}: no such file or folder, and not a preset "
            f"(presets: {', '.join(preset_names())})"
        )
    if path.suffix == ".gguf" and path.is_file():
        if arch is not None:
            raise SourceError(f"--arch is for HorNet checkpoints; {source} is a GGUF file")
        model, texts = gguf.load(path)
        return LoadedModel("llama", model.eval(), str(path.resolve()), None, tokenizer_texts=texts)
    if is_checkpoint_file(source):
        if arch is None:
            raise SourceError(
                f"{source}: a checkpoint file needs --arch (one of {', '.join(HORNET_ARCHS)})"
            )
        state = hornet_checkpoint.read_state_dict(path)
        classes = hornet_checkpoint.head_classes(state)
        model = hornet.HorNet(hornet.variant_config(arch.removeprefix("hornet-"), classes))
        hornet_checkpoint.load_weights(path, state, model, arch)
        return LoadedModel("hornet", model.eval(), str(path.resolve()), None, checkpoint_arch=arch)
    if arch is not None:
        raise SourceError(f"--arch is for checkpoint files; {source} is a model folder")
    # Every name and shape from the files' headers (mapped, nothing read) before a model of the
    # config's sizes is allocated: a config that overstates them would take minutes and
    # gigabytes to be refused.
    open_checkpoint(source)
    if not (path / "config.json").is_file() and meta.is_meta_folder(path):
        model = meta.load(path).eval()
        return LoadedModel("llama", model, str(path.resolve()), None, hf.tokenizer_files(path))
    config = hf.read_config(path)
    model = Llama(config)
    hf.load_weights(path, model)
    return LoadedModel("llama", model.eval(), str(path.resolve()), None, hf.tokenizer_files(path))
