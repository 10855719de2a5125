"""The output folder of `convert`: built in a temporary sibling, renamed into place at the end, so
a failure never leaves a half-written folder behind."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from ..errors import OutputError
from ..onnx_files import save_onnx, umask_mode
from ..runtime.manifest import MANIFEST, MODEL_FILE
from ..runtime.manifest import SUPPORTED_FORMAT as FORMAT_VERSION


@contextlib.contextmanager
def staged_folder(outdir: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `outdir` only if the block succeeds."""
    if outdir.is_symlink():
        raise OutputError(f"{outdir}: is a symbolic link (give the folder itself)")
    if outdir.exists() and not force:
        raise OutputError(f"{outdir}: already exists (use --force to replace it)")
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: exists and is not a folder")
    outdir = outdir.resolve()
    if outdir == Path.cwd().resolve() or outdir in Path.cwd().resolve().parents:
        # Replacing it would delete the folder we stand in, then fail to rename into it.
        raise OutputError(f"{outdir}: is the current folder or holds it (give another path)")
    parent = outdir.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: parent folder does not exist")
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise OutputError(f"{parent}: cannot write here ({e.strerror})") from None
    try:
        yield stage
        umask_mode(stage, 0o777)
        if outdir.exists():
            shutil.rmtree(outdir)
        stage.rename(outdir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_model(model: onnx.ModelProto, folder: Path) -> None:
    save_onnx(model, folder / MODEL_FILE, MODEL_FILE + ".data")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(
        json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2)
    )


def copy_files(files: list[Path], folder: Path) -> None:
    for f in files:
        shutil.copy2(f, folder / f.name)
