"""Parity between PyTorch sources and exported folders (imports torch)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LmexportError
from .report import Check, Report


def run_verify(
    folder: str | Path,
    *,
    source: str | None = None,
    provider: str = "cpu",
    steps: int = 32,
    seed: int = 0,
) -> Report:
    """Run the folder's model and its PyTorch source on the same seeded inputs (`steps`: greedy
    tokens of a Llama)."""
    from ..runtime.manifest import read_manifest

    arch = read_manifest(folder).get("arch")
    if arch == "llama":
        from .llama import verify_llama

        return verify_llama(folder, source=source, provider=provider, steps=steps, seed=seed)
    if arch == "hornet":
        from .hornet import verify_hornet

        return verify_hornet(folder, source=source, provider=provider, seed=seed)
    raise LmexportError(f"{folder}: cannot verify arch {arch!r}")


__all__ = ["Check", "Report", "run_verify"]
