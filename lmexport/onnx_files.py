"""Reading and writing ONNX files, with weights moved to external data when they are large."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from .errors import LmexportError, first_line

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers above which weights go to a .data file


def umask_mode(path: Path, mode: int) -> None:
    """Give a mkstemp/mkdtemp result (private, 600/700) the mode an ordinary file (mode 0o666)
    or folder (0o777) gets under the umask, as the output it is staged to become."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def save_onnx(model: onnx.ModelProto, path: Path, data_location: str) -> None:
    """Write `model` to `path`; above 1 GiB of weights they go to `data_location` beside it."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_location,
        )
        umask_mode(path.parent / data_location, 0o666)  # onnx writes it private (600)
    else:
        onnx.save_model(model, str(path))


def load_onnx(path: Path) -> onnx.ModelProto:
    """The model with its external data, or a one-line error saying why it cannot be read."""
    if not path.is_file():
        raise LmexportError(f"{path}: no such file")
    try:
        return onnx.load(str(path))
    except FileNotFoundError as e:
        missing = Path(str(e.filename)).name
        raise LmexportError(f"{path}: external data file missing ({missing})") from None
    except onnx.checker.ValidationError as e:  # onnx's word for unreadable external data
        raise LmexportError(f"{path}: {first_line(e, 300)}") from None
    except Exception as e:  # protobuf raises DecodeError and friends for anything not ONNX
        raise LmexportError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
