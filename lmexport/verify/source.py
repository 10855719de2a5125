"""The first check of every verify: is the PyTorch source the one the folder was built from?"""

from __future__ import annotations

from typing import Any

import torch

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
