"""lmexport: PyTorch Llama-family and HorNet models to production ONNX, with proven parity.

`convert` and `verify` import torch when first called, so `import lmexport` stays cheap and
`lmexport.runtime` works where torch is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

# Loaded first so that the function `verify` below, not the subpackage of the same name, is what
# `lmexport.verify` names (a first import of a subpackage rebinds the parent's attribute).
from . import verify as _verify_package  # noqa: F401
from .errors import LmexportError

if TYPE_CHECKING:
    from .verify import Report

__version__ = "0.1.0"


def convert(source: str, outdir: str | Path, **options: Any) -> Path:
    """Export a preset or model folder to `outdir`; see `lmexport.exporter.convert`."""
    from .exporter import convert as _convert

    return _convert(source, outdir, **options)


def optimize(source: str | Path, output: str | Path, target: str = "ort", **options: Any) -> Any:
    """Fuse a foreign or plain ONNX graph; see `lmexport.optimizers.optimize_file`."""
    from .optimizers import optimize_file

    return optimize_file(Path(source), Path(output), target, **options)


def verify(folder: str | Path, **options: Any) -> Report:
    """Parity of an output folder against its PyTorch source; see `lmexport.verify.verify`."""
    from .verify import run_verify

    return run_verify(folder, **options)


__all__ = ["LmexportError", "__version__", "convert", "optimize", "verify"]
