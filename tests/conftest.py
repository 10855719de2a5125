from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import lmexport

from helpers import CHATML_TEMPLATE, write_tokenizer


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-tiny converted once (default `ort` target, KV cache) for the tests that only read
    it."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    return lmexport.convert("llama-tiny", out)


@pytest.fixture(scope="session")
def chat_folder(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_folder with a byte-level tokenizer of its vocabulary (512) and SmolLM2's ChatML
    template in tokenizer_config.json, as converted Hugging Face folders have them."""
    out = tmp_path_factory.mktemp("chat") / "out"
    shutil.copytree(tiny_folder, out)
    config = {"chat_template": CHATML_TEMPLATE, "bos_token": "<s>", "eos_token": "<|im_end|>"}
    write_tokenizer(out, **config)
    return out
