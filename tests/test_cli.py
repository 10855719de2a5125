"""The command line: the README's main job, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import assert_bad_input, run, small_config, write_hf_folder


def assert_nothing_written(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith((".out", "out"))]


def test_readme_main_job(tmp_path: Path) -> None:
    """The console script itself, as the README runs it."""
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    steps = [
        ["lmexport", "convert", "llama-tiny", "-o", str(out)],
        ["lmexport", "verify", str(out), "--json", str(tmp_path / "v.json")],
        ["lmexport", "generate", str(out), "--ids", "1,2,3"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
    assert len(done.stdout.split()) == 32
    manifest = json.loads((out / "lmexport.json").read_text())
    assert manifest["arch"] == "llama" and manifest["kv_cache"] is True
    assert [i["name"] for i in manifest["inputs"]][:3] == [
        "input_ids",
        "attention_mask",
        "past_key_values.0.key",
    ]
    assert manifest["outputs"][1]["shape"] == ["batch", 2, "total_sequence", 16]


def test_missing_path(tmp_path: Path) -> None:
    assert_bad_input(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")], "nope")
    assert_nothing_written(tmp_path)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    assert_bad_input(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out")], "config.json")
    assert_nothing_written(tmp_path)


def test_not_llama_family(tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "src", small_config())
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert_bad_input(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out")], "gpt2")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("damage", ["missing", "misshaped", "truncated"])
def test_bad_weights(tmp_path: Path, damage: str) -> None:
    src = tmp_path / "src"
    write_hf_folder(src, small_config())
    file = src / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "truncated":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        words = ["model.safetensors"]
    else:
        state = load_file(str(file))
        if damage == "missing":
            del state[name]
        else:
            state[name] = state[name][:, :-1].contiguous()
        save_file(state, str(file))
        words = [name]
    assert_bad_input(["convert", str(src), "-o", str(tmp_path / "out")], *words)
    assert_nothing_written(tmp_path)


def test_output_exists(tmp_path: Path, tiny_folder: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(["convert", "llama-tiny", "-o", str(out)], "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_ids_outside_vocabulary(tiny_folder: Path) -> None:
    assert_bad_input(["generate", str(tiny_folder), "--ids", "1,99999"], "99999", "vocabulary")


def test_ids_not_numbers(tiny_folder: Path) -> None:
    assert_bad_input(["generate", str(tiny_folder), "--ids", "1,x"], "--ids")


def test_prompt_without_tokenizer(tiny_folder: Path) -> None:
    assert_bad_input(["generate", str(tiny_folder), "--prompt", "hello"], "tokenizer.json")


def test_verify_not_a_folder(tmp_path: Path) -> None:
    assert_bad_input(["verify", str(tmp_path / "nope")], "nope")


def test_verify_failure_exit_code(tiny_folder: Path, tmp_path: Path) -> None:
    """Verifying against another model's weights is a parity failure: exit 1, not 2."""
    code, out, _ = run("verify", str(tiny_folder), "--steps", "4", "--source", "llama-tiny")
    assert code == 0, out
    write_hf_folder(
        tmp_path / "other",
        small_config(vocab_size=512, hidden_size=64, num_hidden_layers=4, intermediate_size=176),
        seed=5,
    )
    report = tmp_path / "v.json"
    code, out, _ = run(
        "verify", str(tiny_folder), "--steps", "4", "--source", str(tmp_path / "other"),
        "--json", str(report),
    )  # fmt: skip
    assert code == 1 and "FAIL" in out
    # Failed on the logits themselves, not only on the other source's weight digest.
    logits = next(c for c in json.loads(report.read_text())["checks"] if c["name"] == "logits")
    assert not logits["passed"] and logits["metrics"]["max_abs"] > 1e-4


def test_inspect(tiny_folder: Path) -> None:
    code, out, _ = run("inspect", str(tiny_folder / "model.onnx"))
    assert code == 0
    assert "input_ids: int64[batch, sequence]" in out and "MatMul" in out


def test_tokenizer_copied_and_used(tmp_path: Path) -> None:
    """With a tokenizer.json in the source, convert copies it and generate speaks text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    config = small_config()
    write_hf_folder(src, config)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))
    out = tmp_path / "out"
    assert run("convert", str(src), "-o", str(out))[0] == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    code, text, err = run("generate", str(out), "--prompt", "w5 w6 w7", "--max-new-tokens", "6")
    assert code == 0, err
    words = text.split()
    assert len(words) == 6 and all(w.startswith("w") for w in words)
    code, ids_text, _ = run("generate", str(out), "--ids", "5,6,7", "--max-new-tokens", "6")
    assert ids_text.split() == words  # same prompt, same greedy tokens, decoded
