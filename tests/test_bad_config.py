"""Bad model configs and options: one-line errors with exit code 2, checked before anything is
allocated or run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lmexport.errors import LmexportError
from lmexport.models.llama import Llama, LlamaConfig

from helpers import assert_bad_input, run, small_config, write_hf_folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "model"
    write_hf_folder(folder, small_config())
    return folder


def changed_copy(hf_folder: Path, tmp_path: Path, **changes: Any) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"num_key_value_heads": 0}, ["num_key_value_heads", "positive integer", "0"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads (4)", "num_key_value_heads (3)"]),
        ({"num_key_value_heads": "2"}, ["num_key_value_heads", "'2'"]),
        ({"hidden_size": -64}, ["hidden_size", "-64"]),
        (
            {"hidden_size": 66, "head_dim": None},
            ["hidden_size (66)", "num_attention_heads (4)"],
        ),
        ({"head_dim": 15}, ["head_dim", "even", "15"]),
        ({"vocab_size": 2.5}, ["vocab_size", "2.5"]),
        ({"num_hidden_layers": True}, ["num_hidden_layers", "True"]),
        ({"max_position_embeddings": 0}, ["max_position_embeddings", "0"]),
        ({"rms_norm_eps": "tiny"}, ["rms_norm_eps", "'tiny'"]),
        ({"rope_theta": "abc"}, ["rope_theta", "'abc'"]),
        ({"rope_theta": -1.0}, ["rope_theta", "-1.0"]),
        ({"rope_scaling": "linear"}, ["rope_scaling", "'linear'"]),
        ({"rope_parameters": [1, 2]}, ["rope_parameters", "[1, 2]"]),
        ({"rope_scaling": {"rope_type": "linear"}}, ["rope_scaling", "linear", "'factor'"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, ["factor", "positive number"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, ["'yarn'", "llama3"]),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
            ["high_freq_factor (4.0)", "low_freq_factor (4.0)"],
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            ["llama3", "'original_max_position_embeddings'"],
        ),
        ({"eos_token_id": "abc"}, ["eos_token_id", "'abc'"]),
        ({"eos_token_id": [2, -1]}, ["eos_token_id", "-1"]),
        ({"bos_token_id": 1.5}, ["bos_token_id", "1.5"]),
        ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings", "'yes'"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v)[:60] if isinstance(v, dict) else "",
)
def test_hf_config_values_are_checked(
    hf_folder: Path, tmp_path: Path, changes: dict[str, Any], words: list[str]
) -> None:
    folder = changed_copy(hf_folder, tmp_path, **changes)
    out = tmp_path / "out"
    assert_bad_input(["convert", str(folder), "-o", str(out)], "config.json", *words)
    assert not out.exists()


def test_hf_config_nulls_take_defaults(hf_folder: Path, tmp_path: Path) -> None:
    """transformers writes null for keys it leaves unset; those mean the default."""
    from lmexport.models.checkpoints.hf import read_config

    folder = changed_copy(
        hf_folder,
        tmp_path,
        head_dim=None,
        rope_scaling=None,
        bos_token_id=None,
        eos_token_id=None,
        mlp_bias=None,
        rope_theta=10000,
    )
    config = read_config(folder)
    assert config.head_dim == 16 and config.rope_scaling is None and config.eos_token_id == []
    assert config.rope_theta == 10000.0 and isinstance(config.rope_theta, float)
    assert config.mlp_bias is False


def test_config_errors_are_lmexport_and_value_errors() -> None:
    """The Python API raises the same check: an LmexportError, still a ValueError as before."""
    with pytest.raises(LmexportError, match="num_key_value_heads must be a positive integer"):
        small_config(num_key_value_heads=0)
    with pytest.raises(ValueError, match="intermediate_size"):
        LlamaConfig(intermediate_size=0)
    assert LlamaConfig().head_dim == 128


def refuse_allocation(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a model of the config's sizes was allocated before the check")


def test_config_larger_than_its_weights_refused_before_allocating(
    hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights' headers are checked first: a model of 10^7 intermediate size (2.5 GB a
    layer here; 28 GB for Llama 3 8B's width) is never built only to be refused."""
    folder = changed_copy(hf_folder, tmp_path, intermediate_size=10**7)
    monkeypatch.setattr("lmexport.models.source.Llama", refuse_allocation)
    out = tmp_path / "out"
    words = ("model.safetensors", "mlp", "10000000")
    assert_bad_input(["convert", str(folder), "-o", str(out)], *words)
    assert not out.exists()


# -- Meta folders: the same checks, in params.json's names --------------------------------------

META_PARAMS = {
    "dim": 64,
    "n_layers": 1,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 256,
    "multiple_of": 32,
    "norm_eps": 1e-5,
}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"n_heads": 0}, ["n_heads", "positive integer"]),
        ({"n_kv_heads": 3}, ["n_heads (4)", "n_kv_heads (3)"]),
        ({"dim": 66}, ["dim (66)", "n_heads (4)"]),
        ({"dim": -64}, ["dim", "-64"]),
        ({"multiple_of": 0}, ["multiple_of"]),
        ({"norm_eps": "abc"}, ["norm_eps", "'abc'"]),
        ({"max_seq_len": 0}, ["max_seq_len", "0"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_meta_params_are_checked(tmp_path: Path, changes: dict[str, Any], words: list[str]) -> None:
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({**META_PARAMS, **changes}))
    torch.save({"tok_embeddings.weight": torch.zeros(256, 64)}, folder / "consolidated.00.pth")
    out = tmp_path / "out"
    assert_bad_input(["convert", str(folder), "-o", str(out)], "params.json", *words)
    assert not out.exists()


def test_meta_params_larger_than_the_weights_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmexport.models.checkpoints import meta

    folder = tmp_path / "meta"
    folder.mkdir()
    config = meta.config_from_params(META_PARAMS, folder / "params.json", 256)
    with torch.device("meta"):
        state = Llama(config).state_dict()
    weights = {meta._their_name(k, False): torch.zeros(v.shape) for k, v in state.items()}
    torch.save(weights, folder / "consolidated.00.pth")
    # multiple_of rounds the MLP's width up to 10^7: its weights are 10^7 times 64.
    (folder / "params.json").write_text(json.dumps({**META_PARAMS, "multiple_of": 10**7}))
    monkeypatch.setattr("lmexport.models.checkpoints.meta.Llama", refuse_allocation)
    out = tmp_path / "out"
    assert_bad_input(["convert", str(folder), "-o", str(out)], "w1", "[10000000, 64]")
    assert not out.exists()


# -- verify: --steps against the context, before any generation ---------------------------------


def test_verify_steps_beyond_context_refused_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("convert", "llama-tiny", "-o", str(out))[0] == 0
    # llama-tiny's context is 512: a prompt of 8 leaves room for 504 greedy steps.
    assert_bad_input(["verify", str(out), "--steps", "505"], "--steps 505", "512")
    start = time.monotonic()
    assert_bad_input(["verify", str(out), "--steps", "100000"], "--steps 100000", "512")
    assert time.monotonic() - start < 30  # refused before any generation ran
