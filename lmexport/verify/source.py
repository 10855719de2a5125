"""The first check of every verify: is the PyTorch source the one the folder was built from?"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import LmexportError
from ..models.source import weights_sha256
from .report import Check


def source_weights_check(model: torch.nn.Module, manifest: dict[str, Any]) -> Check:
    digest = weights_sha256(model)
    expected = manifest["source"].get("weights_sha256")
    return Check(
        "source_weights",
        digest == expected,
        {"sha256": digest[:16]},
        f"expected {str(expected)[:16]}",
    )


def check_same_shape(
    source: dict[str, Any], folder: dict[str, Any], name: str, fields: Iterable[str]
) -> None:
    """Refuse a source of another shape than the folder's (`verify --source` or `bench
    --source` naming another model): nothing of it could be compared. `fields`: the config
    entries that set the tensor shapes."""
    for key in fields:
        if source.get(key) != folder.get(key):
            raise LmexportError(
                f"{name}: {key} is {source.get(key)}, the folder's lmexport.json says "
                f"{folder.get(key)} (a source of another shape than the folder)"
            )
