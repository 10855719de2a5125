"""Bad input a user may plausibly type, found by a review: each is one line and exit code 2,
nothing deleted, nothing half-written, and refused before the long part of the run."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import lmexport
from lmexport.errors import LmexportError, RuntimeInputError
from lmexport.models.installed import INSTALLED
from lmexport.models.llama import LlamaConfig
from lmexport.models.presets import PRESETS
from lmexport.runtime import LlamaRunner

from helpers import assert_bad_input, run, small_config, write_hf_folder


def test_force_never_replaces_the_current_folder(tmp_path: Path) -> None:
    """`-o . --force` used to empty the folder it stood in, then fail to rename into it."""
    here = tmp_path / "work" / "sub"
    here.mkdir(parents=True)
    (here / "keep.txt").write_text("x")
    cwd = Path.cwd()
    os.chdir(here)
    try:
        assert_bad_input(["convert", "llama-tiny", "-o", ".", "--force"], "current folder")
        assert_bad_input(["convert", "llama-tiny", "-o", "..", "--force"], "current folder")
    finally:
        os.chdir(cwd)
    assert (here / "keep.txt").read_text() == "x"


def test_force_onto_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert_bad_input(
        ["convert", "llama-tiny", "-o", str(tmp_path / "link"), "--force"], "symbolic link"
    )
    assert (tmp_path / "real").is_dir() and not any((tmp_path / "real").iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "llama-tiny", "-o", "x", "--seed", "abc"],  # click's own checks: one line
        ["verify", "FOLDER", "--steps", "abc"],
        ["verify", "FOLDER", "--seed", "-1"],
        ["generate", "FOLDER", "--ids", "1,2", "--temperature", "1", "--seed", "-5"],
        ["classify"],
        ["--no-such-option"],
    ],
)
def test_usage_errors_are_one_line(args: list[str], tiny_folder: Path) -> None:
    assert_bad_input([str(tiny_folder) if a == "FOLDER" else a for a in args])


def test_report_paths_checked_before_the_run(tiny_folder: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "r.json")
    assert_bad_input(["verify", str(tiny_folder), "--json", missing], "--json", "does not exist")
    assert_bad_input(["verify", str(tiny_folder), "--json", str(tmp_path)], "is a folder")
    assert_bad_input(
        ["bench", str(tiny_folder), "--new-tokens", "2", "--json", missing], "does not exist"
    )
    out = tmp_path / "o.onnx"
    model = str(tiny_folder / "model.onnx")
    assert_bad_input(["optimize", model, "-o", str(out), "--report", missing], "--report")
    assert not out.exists()


def test_optimize_output_needs_force(tiny_folder: Path, tmp_path: Path) -> None:
    """An existing file was overwritten silently (and made private); a folder gave a traceback."""
    plain = lmexport.convert("llama-tiny", tmp_path / "plain", target="plain", kv_cache=False)
    victim = tmp_path / "victim.onnx"
    victim.write_text("keep")
    assert_bad_input(["optimize", str(plain / "model.onnx"), "-o", str(victim)], "--force")
    assert victim.read_text() == "keep"
    (tmp_path / "empty").mkdir()
    assert_bad_input(
        ["optimize", str(plain / "model.onnx"), "-o", str(tmp_path / "empty"), "--force"],
        "is a folder",
    )
    code, _, err = run("optimize", str(plain / "model.onnx"), "-o", str(victim), "--force")
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert victim.stat().st_mode & 0o777 == 0o666 & ~umask


def test_optimize_force_over_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph with its weights in OUT.onnx.data (above 1 GiB; the threshold lowered here)
    replaced with --force: onnx refused to overwrite the old .data file (a traceback)."""
    import onnx

    from lmexport import onnx_files

    plain = lmexport.convert("llama-tiny", tmp_path / "plain", target="plain", kv_cache=False)
    out, data = tmp_path / "big.onnx", tmp_path / "big.onnx.data"
    args = ["optimize", str(plain / "model.onnx"), "-o", str(out), "--force"]
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 0)
    for _ in range(2):
        code, _, err = run(*args)
        assert code == 0, err
        assert data.is_file()
        onnx.checker.check_model(str(out), full_check=True)
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 1 << 30)
    code, _, err = run(*args)
    assert code == 0, err
    assert not data.exists()  # the old weights went with the old graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "plain"]


def test_bench_limits(tiny_folder: Path) -> None:
    assert_bad_input(["bench", str(tiny_folder), "--threads", "100000"], "threads", "[1, ")
    assert_bad_input(
        ["bench", str(tiny_folder), "--source", "llama-tiny"], "--source", "--vs-torch"
    )


def test_image_size_has_a_ceiling() -> None:
    assert_bad_input(["convert", "hornet-tiny-7x7", "-o", "x", "--image-size", "100000"], "2048")


def test_manifest_missing_keys(tiny_folder: Path, tmp_path: Path) -> None:
    for key in ("config", "kv_cache", "source", "arch"):
        folder = tmp_path / key
        shutil.copytree(tiny_folder, folder)
        manifest = json.loads((folder / "lmexport.json").read_text())
        del manifest[key]
        (folder / "lmexport.json").write_text(json.dumps(manifest))
        assert_bad_input(["generate", str(folder), "--ids", "1,2"], "lmexport.json", key)


def rewrite_manifest(tiny_folder: Path, folder: Path, **changes: Any) -> Path:
    shutil.copytree(tiny_folder, folder)
    manifest = json.loads((folder / "lmexport.json").read_text())
    (folder / "lmexport.json").write_text(json.dumps({**manifest, **changes}))
    return folder


def test_manifest_fields_inside_config_and_source(tiny_folder: Path, tmp_path: Path) -> None:
    """An empty `source` crashed verify (load_source(None)), an empty `config` verify and
    generate (KeyError 'num_hidden_layers'): what they read inside them is checked on loading."""
    folder = rewrite_manifest(tiny_folder, tmp_path / "source", source={})
    assert_bad_input(["verify", str(folder)], "lmexport.json", "source.name or source.path")
    folder = rewrite_manifest(tiny_folder, tmp_path / "config", config={})
    for args in (["verify", str(folder)], ["generate", str(folder), "--ids", "1,2"]):
        assert_bad_input(args, "lmexport.json", "config.num_hidden_layers", "config.vocab_size")
    config = {**json.loads((tiny_folder / "lmexport.json").read_text())["config"]}
    folder = rewrite_manifest(tiny_folder, tmp_path / "typed", config={**config, "head_dim": "16"})
    assert_bad_input(["generate", str(folder), "--ids", "1,2"], "config.head_dim")
    hornet = {"variant": "tiny-7x7", "num_classes": "1000"}
    folder = rewrite_manifest(
        tiny_folder, tmp_path / "hornet", arch="hornet", config=hornet, preprocess={}
    )
    words = ("lmexport.json", "config.num_classes", "preprocess.image_size")
    assert_bad_input(["classify", str(folder), "x.png"], *words)


def test_seed_is_for_presets(tmp_path: Path) -> None:
    """`--seed` on any other source was silently ignored, the folder recording seed null."""
    write_hf_folder(tmp_path / "hf", small_config())
    ckpt = tmp_path / "hornet.pth"
    ckpt.write_bytes(b"")  # refused before it is read
    hf = str(tmp_path / "hf")
    for source in ([hf], [hf, "--streaming"], [str(ckpt), "--arch", "hornet-tiny-7x7"]):
        args = ["convert", *source, "--seed", "3", "-o", str(tmp_path / "out")]
        assert_bad_input(args, "--seed is for presets", source[0])
    with pytest.raises(LmexportError, match="--seed is for presets"):
        lmexport.convert(hf, tmp_path / "out", seed=3)
    assert not (tmp_path / "out").exists()


def test_runner_seed_and_temperature(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    with pytest.raises(RuntimeInputError, match="seed"):
        runner.generate([[1, 2]], 2, temperature=1.0, seed=-5)
    with pytest.raises(RuntimeInputError, match="finite"):
        runner.generate([[1, 2]], 2, temperature=float("inf"))


@pytest.mark.parametrize("streaming", [False, True])
def test_force_never_replaces_the_source(tmp_path: Path, streaming: bool) -> None:
    """`convert models/my-llama -o models --force` deleted the checkpoint it had just read and
    wrote a folder whose lmexport.json pointed into it; `-o` the source itself did the same."""
    source = tmp_path / "models" / "my-llama"
    write_hf_folder(source, small_config())
    files = sorted(p.name for p in source.iterdir())
    mode = ["--streaming"] if streaming else []
    for out in (source, tmp_path / "models"):
        what = "is the source" if out == source else "holds the source"
        assert_bad_input(["convert", str(source), "-o", str(out), "--force", *mode], what)
        assert sorted(p.name for p in source.iterdir()) == files
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["my-llama"]


def test_optimize_force_never_replaces_its_source(tiny_folder: Path, tmp_path: Path) -> None:
    source = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_folder, source)
    for out in (source, tmp_path / "models"):
        what = "is the source" if out == source else "holds the source"
        assert_bad_input(["optimize", str(source), "-o", str(out), "--force"], what)
        assert (source / "model.onnx").is_file()


def test_force_never_replaces_a_symlinked_source_file(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot links its files from `blobs/`: an output folder holding
    those is refused too."""
    write_hf_folder(tmp_path / "blobs", small_config())
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in (tmp_path / "blobs").iterdir():
        (snapshot / f.name).symlink_to(f)
    args = ["convert", str(snapshot), "-o", str(tmp_path / "blobs"), "--force"]
    assert_bad_input(args, "holds the source")
    assert (tmp_path / "blobs" / "model.safetensors").is_file()


def test_force_never_replaces_the_adapter(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    args = ["convert", "llama-tiny", "--adapter", str(out / "adapter"), "-o", str(out), "--force"]
    assert_bad_input(args, "holds the adapter")
    assert (out / "adapter" / "adapter_config.json").read_text() == "{}"


def test_force_never_replaces_a_symlinked_adapter_file(tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "adapter_config.json").write_text("{}")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "adapter_config.json").symlink_to(tmp_path / "blobs" / "adapter_config.json")
    args = ["convert", "llama-tiny", "--adapter", str(snapshot), "-o", str(tmp_path / "blobs")]
    assert_bad_input([*args, "--force"], "holds the adapter")
    assert (tmp_path / "blobs" / "adapter_config.json").read_text() == "{}"


def test_symlink_loop_in_the_source_folder(tmp_path: Path) -> None:
    """An unrelated looping link beside the weights: the folder converts as before."""
    write_hf_folder(tmp_path / "hf", small_config())
    (tmp_path / "hf" / "loop").symlink_to("loop")
    code, _, err = run("convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "model.onnx").is_file()


@pytest.mark.parametrize("name", ["model.gguf", "hornet.pth"])
def test_force_never_replaces_a_source_file(tmp_path: Path, name: str) -> None:
    """A GGUF or checkpoint file, or the folder holding it, is refused as -o before it is read."""
    source = tmp_path / "models" / name
    source.parent.mkdir()
    source.write_bytes(b"keep")
    arch = ["--arch", "hornet-tiny-7x7"] if name.endswith(".pth") else []
    for out, what in ((source, "is the source"), (source.parent, "holds the source")):
        assert_bad_input(["convert", str(source), *arch, "-o", str(out), "--force"], what)
        assert source.read_bytes() == b"keep"


def test_force_never_replaces_an_installed_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed name (`smollm2-135m-instruct`) is a GGUF file inside its package's folder."""
    package = tmp_path / "site" / "fake_installed_llm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"keep")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(INSTALLED, "fake-llm", ("fake_installed_llm", "*.gguf", "pip install x"))
    assert_bad_input(["convert", "fake-llm", "-o", str(package), "--force"], "holds the source")
    assert (package / "model.gguf").read_bytes() == b"keep"


def test_force_onto_a_folder_named_like_the_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preset is no file: a folder of its name is an ordinary output, replaced with --force."""
    monkeypatch.chdir(tmp_path)
    Path("llama-tiny").mkdir()
    code, _, err = run("convert", "llama-tiny", "-o", "llama-tiny", "--force", "-q")
    assert code == 0, err
    assert Path("llama-tiny", "lmexport.json").is_file()


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 1000),
        ("hidden_size", 128),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
        ("head_dim", 32),
        ("intermediate_size", 200),
    ],
)
def test_source_of_another_shape(tiny_folder: Path, tmp_path: Path, field: str, value: int) -> None:
    """`verify --source` (and `bench --vs-torch --source`) naming a Llama of another shape than
    the folder's crashed in numpy with a broadcasting traceback."""
    config = PRESETS["llama-tiny"].config
    assert isinstance(config, LlamaConfig)
    expected = getattr(config, field)
    write_hf_folder(tmp_path / "other", replace(config, **{field: value}))
    other = str(tmp_path / "other")
    words = (field, f"is {value}", f"says {expected}")
    assert_bad_input(["verify", str(tiny_folder), "--source", other], *words)
    args = ["bench", str(tiny_folder), "--vs-torch", "--source", other, "--new-tokens", "2"]
    assert_bad_input([*args, "--prompt-length", "4", "--repeats", "1"], *words)
