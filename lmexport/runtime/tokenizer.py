"""The folder's `tokenizer.json`, through Hugging Face `tokenizers` when it is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LmexportError


def load_tokenizer(folder: str | Path) -> Any:
    """A `tokenizers.Tokenizer`, or a clear error when the folder has none."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise LmexportError(
            f"{folder}: no tokenizer.json, so there is no text to encode or decode (work in token "
            "ids: --ids, generate() or stream())"
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LmexportError("reading tokenizer.json needs the `tokenizers` package") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise LmexportError(f"{path}: unreadable tokenizer ({e})") from None
