"""The output folder of `convert`: built in a temporary sibling, renamed into place at the end, so
a failure never leaves a half-written folder behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from ..errors import OutputError, SourceError
from ..models.installed import INSTALLED, installed_path
from ..models.presets import PRESETS
from ..onnx_files import save_onnx, umask_mode
from ..runtime.manifest import MANIFEST, MODEL_FILE
from ..runtime.manifest import SUPPORTED_FORMAT as FORMAT_VERSION


@contextlib.contextmanager
def staged_folder(
    outdir: Path,
    force: bool,
    *,
    source: str | Path | None = None,
    adapter: str | Path | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `outdir` only if the block succeeds.

    `source` (a SOURCE argument: preset or installed name, folder or file; a Path is a path
    only) and `adapter` are what the block reads: an `outdir` that is one of them or holds one
    is refused before anything is written, since replacing it would delete them."""
    if outdir.is_symlink():
        raise OutputError(f"{outdir}: is a symbolic link (give the folder itself)")
    resolved = _real(outdir)
    for kind, path in _inputs(source, adapter):
        if resolved == path or resolved in path.parents:
            what = "is" if resolved == path else "holds"
            raise OutputError(
                f"{outdir}: {what} the {kind} {path} (replacing it would delete it; "
                "give another path)"
            )
    if outdir.exists() and not force:
        raise OutputError(f"{outdir}: already exists (use --force to replace it)")
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: exists and is not a folder")
    outdir = resolved
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


def _inputs(source: str | Path | None, adapter: str | Path | None) -> list[tuple[str, Path]]:
    """The files and folders `source` and `adapter` name, resolved as `load_source` reads them
    (an installed name is its file; a preset is none), with the targets of a folder's symbolic
    links (a Hugging Face cache snapshot links its files from `blobs/`)."""
    found: list[tuple[str, Path]] = []
    if isinstance(source, str) and source in INSTALLED:
        with contextlib.suppress(SourceError):  # not installed: load_source says so
            found.append(("source", _real(installed_path(source))))
    elif not (isinstance(source, str) and source in PRESETS) and source is not None:
        found += [("source", p) for p in _with_link_targets(Path(source))]
    if adapter is not None:
        found += [("adapter", p) for p in _with_link_targets(Path(adapter))]
    return found


def _real(path: Path) -> Path:
    # os.path.realpath, unlike Path.resolve on Python 3.11, does not raise on a symlink loop.
    return Path(os.path.realpath(path))


def _with_link_targets(path: Path) -> list[Path]:
    if not path.exists():
        return []
    found = [_real(path)]
    if path.is_dir():
        with contextlib.suppress(OSError):  # an unreadable folder: load_source says so
            found += [_real(f) for f in path.iterdir() if f.is_symlink()]
    return found


def save_model(model: onnx.ModelProto, folder: Path) -> None:
    """Write and check the folder's graph. The checker reads the file: a proto whose weights
    pass 2 GiB cannot be serialised whole to check it in memory."""
    save_onnx(model, folder / MODEL_FILE, MODEL_FILE + ".data")
    onnx.checker.check_model(str(folder / MODEL_FILE), full_check=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(
        json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2)
    )


def copy_files(files: list[Path], folder: Path) -> None:
    for f in files:
        shutil.copy2(f, folder / f.name)
