"""onnxruntime-genai runs an `ort` folder (through its genai_config.json) to the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmexport.runtime import LlamaRunner

og = pytest.importorskip("onnxruntime_genai")


def test_genai_greedy_tokens(tiny_folder: Path) -> None:
    config = json.loads((tiny_folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 4
    prompt = [3, 14, 15, 92, 65]
    model = og.Model(str(tiny_folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    genai_tokens = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    ours = LlamaRunner.load(tiny_folder).generate([prompt], 24, eos_token_id=[])[0].tolist()
    assert len(genai_tokens) == 24 and genai_tokens == ours
