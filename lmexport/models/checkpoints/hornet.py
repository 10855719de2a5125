"""HorNet checkpoints as the official release saves them: a `.pth` holding the model's state_dict,
or the training script's `{"model": state_dict, "optimizer": ..., "epoch": ..., "args": ...}`.

Checkpoints are untrusted: they are unpickled with `torch.load(weights_only=True)`, which builds
only tensors and plain containers. The one class training checkpoints add, the
`argparse.Namespace` of training arguments, is allowed by name; anything else that needs
unpickling is refused, never loaded with `weights_only=False`.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import SourceError, first_line, listed

SAFE_GLOBALS: list[Any] = [argparse.Namespace]
STATE_DICT_KEYS = ("model", "state_dict")  # where training scripts put the weights


# What torch's weights-only unpickler says when a file asks for more than tensors and plain
# containers: a class or function by name, or an object built or called outside the allowlist.
# Any other unpickling error (an unknown opcode, a cut-off stream) means the bytes are not a
# checkpoint at all.
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) (?:was not an allowed global|whose module)")
UNSAFE_OBJECT = (
    "Trying to call reduce for unrecognized function",
    "Can only create new object for",
    "Can only build Tensor, Parameter, OrderedDict or types allowlisted",
    "must be imported to load",
)


def _unpickler_reason(message: str) -> str:
    """The unpickler's own words, without torch's advice around them."""
    inner = message.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in inner.splitlines() if line.strip()]
    return lines[0][:200] if lines else "unreadable pickle"


def _load(path: Path) -> Any:
    # A zip checkpoint (torch ≥ 1.6) is memory-mapped: tensors are not read until copied.
    mmap = zipfile.is_zipfile(path)
    with path.open("rb") as f:
        head = f.read(2)
    if not mmap and head.startswith(b"PK"):
        raise SourceError(f"{path}: not a readable PyTorch checkpoint (a damaged zip archive)")
    if not mmap and head[:1] != b"\x80":  # the legacy format starts with a pickle's
        raise SourceError(
            f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle)"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        message = str(e)
        found = UNSAFE_GLOBAL.search(message)
        if found or any(words in message for words in UNSAFE_OBJECT):
            what = f"the class or function {found.group(1)}" if found else "objects"
            raise SourceError(
                f"{path}: refused: unpickling it needs {what}, which could run code "
                "(only tensors, plain containers and argparse.Namespace are read)"
            ) from None
        raise SourceError(
            f"{path}: not a readable PyTorch checkpoint ({_unpickler_reason(message)})"
        ) from None
    except Exception as e:  # torch.load raises many types for files that are not checkpoints
        # The first sentence: miniz's messages go on to guess at causes.
        first = first_line(e).split(". ")[0]
        raise SourceError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SourceError(f"{path}: no such checkpoint file")
    data = _load(path)
    if isinstance(data, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not any(isinstance(v, Tensor) for v in data.values()):
        raise SourceError(f"{path}: holds no state_dict (expected one, or {{'model': state_dict}})")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise SourceError(f"{path}: the state_dict has non-tensor entries ({listed(bad, 4)})")
    return data


def head_classes(state: dict[str, Tensor]) -> int:
    """The class count of a checkpoint's head: ImageNet-22K checkpoints (the official HorNet-L
    ones) have 21841. Without a usable `head.weight`, ImageNet's 1000, so that `load_weights`
    names what is missing or mis-shaped."""
    head = state.get("head.weight")
    return head.shape[0] if head is not None and head.ndim == 2 and head.shape[0] > 0 else 1000


def load_weights(path: Path, state: dict[str, Tensor], model: torch.nn.Module, arch: str) -> None:
    """Copy `state` (read from `path`) into `model`; missing, extra or mis-shaped tensors are
    named."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    problems = [f"missing {listed(missing, 4)}"] if missing else []
    problems += [f"unexpected {listed(extra, 4)}"] if extra else []
    if problems:
        raise SourceError(f"{path}: does not fit --arch {arch}: {'; '.join(problems)}")
    for name, tensor in state.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise SourceError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"--arch {arch} needs {list(want.shape)}"
            )
        with torch.no_grad():
            want.copy_(tensor.to(want.dtype))
