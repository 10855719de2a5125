from __future__ import annotations

from pathlib import Path

import pytest

import lmexport


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-tiny converted once (plain target, KV cache) for the tests that only read it."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    return lmexport.convert("llama-tiny", out)
