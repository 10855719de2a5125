"""Checkpoint folders read one tensor at a time, for the streaming converter.

Opening one reads only what describes the tensors: safetensors headers, or the pickles of Meta's
`.pth` shards (memory-mapped, so no tensor data is touched), and checks names and shapes against
the config with the same messages as the loaders that build the whole model (`hf.py`, `meta.py`).
Tensors are then read on demand under our parameter names and in our layout (Meta's shards
joined and its Q/K rows reordered), in the dtype they are stored in. A safetensors file is opened
for each read and closed after it, so its memory map never holds more than the tensor asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ...errors import SourceError, listed
from ..llama import Llama, LlamaConfig
from . import hf, meta
from .hornet import read_state_dict


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model of `config` has, and its shape (a tied LM head is left out)."""
    with torch.device("meta"):
        state = Llama(config).state_dict()
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    return {name: tuple(t.shape) for name, t in state.items()}


class LazyCheckpoint(ABC):
    """A checkpoint folder's config and the shapes and dtypes of its weights; `read` and
    `rows` read one tensor, or some of its rows."""

    folder: Path
    config: LlamaConfig
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    @abstractmethod
    def read(self, name: str) -> Tensor: ...

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.read(name)[start:stop]

    def tokenizer_files(self) -> list[Path]:
        return hf.tokenizer_files(self.folder)


class SafetensorsCheckpoint(LazyCheckpoint):
    """A Hugging Face folder: `config.json` and safetensors, single or sharded."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = hf.read_config(folder)
        expected = expected_shapes(self.config)
        tied = self.config.tie_word_embeddings
        self._files: dict[str, Path] = {}
        self.shapes, self.dtypes = {}, {}
        for path in hf._weight_files(folder):
            with self._open(path) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name.endswith(hf.IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                        continue
                    if name not in expected:
                        raise SourceError(f"{path.name}: unexpected tensor {name!r}")
                    view = f.get_slice(name)
                    shape = tuple(view.get_shape())
                    if shape != expected[name]:
                        raise SourceError(
                            f"{path.name}: tensor {name!r} has shape {list(shape)}, "
                            f"the config needs {list(expected[name])}"
                        )
                    self._files[name] = path
                    self.shapes[name] = shape
                    self.dtypes[name] = view[0:0].dtype
        missing = sorted(set(expected) - set(self._files))
        if missing:
            raise SourceError(f"{folder}: missing tensors {listed(missing)}")
        self.shapes = {name: self.shapes[name] for name in expected}

    @staticmethod
    def _open(path: Path) -> safe_open:
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path}: unreadable safetensors file ({e})") from None

    def read(self, name: str) -> Tensor:
        path = self._files[name]
        try:
            with self._open(path) as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path}: cannot read {name!r} ({e})") from None

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        path = self._files[name]
        try:
            with self._open(path) as f:
                return f.get_slice(name)[start:stop]
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path}: cannot read {name!r} ({e})") from None


class MetaCheckpoint(LazyCheckpoint):
    """A Meta folder (`params.json`, `consolidated.NN.pth`) or torchtune's single checkpoint
    file. A tensor split across shards is joined from every shard's piece: each read maps the
    shards again and drops them after, and the last tensor read is kept for `rows`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / meta.PARAMS
        raw = meta.read_params(folder)
        self._paths = meta.weight_files(folder)
        # Shapes and dtypes only: every tensor becomes a stand-in on the meta device.
        self._their: list[dict[str, str]] = []  # per shard: our name → the file's name
        shards: list[dict[str, Tensor]] = []
        styles: list[bool] = []
        for f in self._paths:
            stand_ins = self._stand_ins(f)
            theirs = {id(t): k for k, t in stand_ins.items()}
            renamed, torchtune = meta._rename(stand_ins, f)
            shards.append(renamed)
            styles.append(torchtune)
            self._their.append({ours: theirs[id(t)] for ours, t in renamed.items()})
        tied = not any("lm_head.weight" in s for s in shards)
        self.config = meta.config_from_params(raw, path, meta._vocab_size(raw, shards, path), tied)
        expected = expected_shapes(self.config)
        for f, s, torchtune in zip(self._paths, shards, styles, strict=True):
            missing = [meta._their_name(k, torchtune) for k in expected if k not in s]
            if missing:
                raise SourceError(f"{f.name}: missing tensors {listed(missing)}")
            extra = [meta._their_name(k, torchtune) for k in s if k not in expected]
            if extra:
                raise SourceError(
                    f"{f.name}: unexpected tensor {extra[0]!r} ({meta.PARAMS} says n_layers "
                    f"{self.config.num_hidden_layers})"
                )
        self._torchtune = styles[0]
        self.shapes, self.dtypes = {}, {}
        for name, want in expected.items():
            joined = self._join(name, [s[name] for s in shards], want)  # checks the shapes
            self.shapes[name], self.dtypes[name] = want, joined.dtype
        self._last: tuple[str, Tensor] | None = None

    @staticmethod
    def _stand_ins(path: Path) -> dict[str, Tensor]:
        """The file's tensors as meta-device stand-ins: names, shapes and dtypes, no data."""
        if path.suffix != ".safetensors":  # memory-mapped: nothing is read
            return {k: torch.empty_like(v, device="meta") for k, v in read_state_dict(path).items()}
        try:
            with safe_open(str(path), framework="pt") as f:
                views = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
                return {
                    k: torch.empty(v.get_shape(), dtype=v[0:0].dtype, device="meta")
                    for k, v in views.items()
                }
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path}: unreadable safetensors file ({e})") from None

    def _join(self, name: str, parts: list[Tensor], want: tuple[int, ...]) -> Tensor:
        label = meta._their_name(name, self._torchtune)
        return meta._join(name, parts, want, self._paths, label)

    def read(self, name: str) -> Tensor:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._last = None
        parts = [self._part(i, name) for i in range(len(self._paths))]
        tensor = self._join(name, parts, self.shapes[name])
        if tensor.data_ptr() == parts[0].data_ptr():
            tensor = tensor.clone()  # not a view of the mapped file
        projection = name.split(".")[-2]
        heads = {"q_proj": self.config.num_attention_heads, "k_proj": self.config.n_kv_heads}
        if projection in heads:
            tensor = meta.interleaved_to_halves(tensor, heads[projection]).contiguous()
        self._last = (name, tensor)
        return tensor

    def _part(self, shard: int, name: str) -> Tensor:
        path, theirs = self._paths[shard], self._their[shard][name]
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(theirs)
            except (SafetensorError, OSError) as e:
                raise SourceError(f"{path}: cannot read {theirs!r} ({e})") from None
        return read_state_dict(path)[theirs]


def open_checkpoint(source: str) -> LazyCheckpoint:
    """A Hugging Face or Meta/torchtune folder, ready to be read tensor by tensor."""
    folder = Path(source)
    if not folder.is_dir():
        raise SourceError(
            f"{source}: --streaming reads a model folder (Hugging Face safetensors, or Meta/"
            "torchtune); presets, GGUF and HorNet files are converted in memory"
        )
    if not (folder / "config.json").is_file() and meta.is_meta_folder(folder):
        return MetaCheckpoint(folder)
    return SafetensorsCheckpoint(folder)
