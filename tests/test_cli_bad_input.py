"""Bad input a user may plausibly type, found by a review: each is one line and exit code 2,
nothing deleted, nothing half-written, and refused before the long part of the run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import lmexport
from lmexport.errors import RuntimeInputError
from lmexport.runtime import LlamaRunner

from helpers import assert_bad_input, run


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


def test_runner_seed_and_temperature(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    with pytest.raises(RuntimeInputError, match="seed"):
        runner.generate([[1, 2]], 2, temperature=1.0, seed=-5)
    with pytest.raises(RuntimeInputError, match="finite"):
        runner.generate([[1, 2]], 2, temperature=float("inf"))
