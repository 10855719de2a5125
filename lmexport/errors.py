"""The exceptions the CLI reports as a one-line message with exit code 2.

Anything else escaping a command is a bug in lmexport and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class LmexportError(Exception):
    """Bad input or usage: the message alone tells the user what to fix."""


class SourceError(LmexportError):
    """A model source (preset, folder, checkpoint) cannot be loaded."""


class ConfigError(SourceError, ValueError):
    """A model configuration value that no model can be built from (a ValueError too, as it
    always was for Python callers); loaders catch it to name the file it came from."""


class OutputError(LmexportError):
    """The output location cannot be written as asked."""


class RuntimeInputError(LmexportError):
    """Inputs given to an exported model do not fit it."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """A foreign exception (onnxruntime's, torch.load's) cut to fit a one-line message: its
    first line, at most `limit` characters, or its type when it says nothing."""
    return str(e).splitlines()[0][:limit] if str(e) else type(e).__name__


def listed(names: Sequence[object], limit: int = 3) -> str:
    """The first `limit` names of a list too long for a one-line message, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more
