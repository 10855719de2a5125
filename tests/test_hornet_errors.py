"""Bad HorNet input: one-line errors with exit code 2, nothing exported."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import lmexport
from lmexport.models.hornet import HorNet, init_random, variant_config
from lmexport.models.presets import HORNET_ARCHS
from lmexport.models.source import load_source
from lmexport.verify.hornet import _source_model

from helpers import assert_bad_input, run


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return HorNet(variant_config("tiny-7x7")).state_dict()


def convert_args(ckpt: Path, arch: str = "hornet-tiny-7x7") -> list[str]:
    return ["convert", str(ckpt), "--arch", arch, "-o", str(ckpt.parent / "out")]


def assert_nothing_written(ckpt: Path) -> None:
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]


def test_missing_and_extra_keys_named(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    damaged = dict(state)
    del damaged["stages.2.5.gamma1"], damaged["head.bias"]
    damaged["stages.2.5.gnconv.dwconv.complex_weight"] = torch.zeros(240, 14, 8, 2)
    ckpt = tmp_path / "damaged.pth"
    torch.save({"model": damaged}, ckpt)
    assert_bad_input(
        convert_args(ckpt),
        "missing stages.2.5.gamma1, head.bias",
        "unexpected stages.2.5.gnconv.dwconv.complex_weight",
    )
    assert_nothing_written(ckpt)


def test_wrong_variant_names_the_shape(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.pth"
    torch.save(state, ckpt)  # a bare state_dict
    assert_bad_input(convert_args(ckpt, "hornet-small-7x7"), "downsample_layers.0.0.weight", "96")
    assert_nothing_written(ckpt)


def test_imagenet_22k_head_sets_the_class_count(
    state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """The official HorNet-L checkpoints are ImageNet-22K: a 21841-way head, refused as mis-shaped
    while the class count was always 1000. `verify` rebuilds the model from the folder's record
    of its source, so it must read the count the same way."""
    wide = dict(state)
    wide["head.weight"], wide["head.bias"] = torch.randn(21841, 512), torch.randn(21841)
    ckpt = tmp_path / "in22k.pth"
    torch.save({"model": wide}, ckpt)
    model = load_source(str(ckpt), arch="hornet-tiny-7x7").model
    assert isinstance(model, HorNet) and model.config.num_classes == 21841
    assert torch.equal(model.head.weight, wide["head.weight"])
    record = {"kind": "checkpoint", "path": str(ckpt.resolve()), "arch": "hornet-tiny-7x7"}
    config = variant_config("tiny-7x7", 21841).to_dict()
    rebuilt, _ = _source_model({"source": record, "config": config}, None)
    assert rebuilt.config.num_classes == 21841


def test_head_bias_must_fit_the_head(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    wide = dict(state)
    wide["head.weight"] = torch.zeros(21841, 512)
    ckpt = tmp_path / "half22k.pth"
    torch.save(wide, ckpt)
    assert_bad_input(convert_args(ckpt), "'head.bias' has shape [1000]", "needs [21841]")
    assert_nothing_written(ckpt)


def test_unknown_arch_lists_valid(tmp_path: Path) -> None:
    ckpt = tmp_path / "x.pth"
    torch.save({}, ckpt)
    assert_bad_input(convert_args(ckpt, "hornet-tiny-5x5"), "hornet-tiny-5x5", *HORNET_ARCHS)
    assert_bad_input(["convert", str(ckpt), "-o", str(tmp_path / "o")], "--arch", *HORNET_ARCHS)


class Hook:
    """Unpickling it calls a function: what weights_only loading must never do."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled",))


def test_code_in_pickle_refused(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    ckpt = tmp_path / "evil.pth"
    torch.save({"model": state, "hook": Hook()}, ckpt)
    assert_bad_input(convert_args(ckpt), "evil.pth", "function print", "could run code")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "notes.pth"
    ckpt.write_text("just text")
    words = ("notes.pth", "not a readable PyTorch checkpoint", "neither a zip archive nor a pickle")
    assert_bad_input(convert_args(ckpt), *words)
    ckpt = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, ckpt)
    assert_bad_input(convert_args(ckpt), "empty.pth", "no state_dict")


def test_not_a_checkpoint_is_not_called_a_security_refusal(
    state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Bytes that are no pickle (or a cut-off file) are unreadable, not refused as unsafe."""
    noise = tmp_path / "garbage.pth"
    noise.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(300)))
    whole = tmp_path / "whole.pth"
    torch.save({"model": state}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:4096])
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": state}, legacy, _use_new_zipfile_serialization=False)
    cut_legacy = tmp_path / "cut_legacy.pth"
    cut_legacy.write_bytes(legacy.read_bytes()[:4096])
    for ckpt in (noise, cut, cut_legacy):
        code, _, err = run(*convert_args(ckpt))
        assert code == 2 and err.count("\n") == 1, err
        assert f"{ckpt.name}: not a readable PyTorch checkpoint" in err, err
        assert "could run code" not in err and "refused" not in err, err
    assert "(a damaged zip archive)" in run(*convert_args(cut))[2]


def test_llama_only_options_refused(tmp_path: Path) -> None:
    """As --image-size is for a Llama: refused, nothing written."""
    assert_bad_input(
        ["convert", "hornet-tiny-7x7", "--no-kv-cache", "-o", str(tmp_path / "o")],
        "--no-kv-cache applies to Llama models only",
    )
    assert not (tmp_path / "o").exists()


def test_options_that_do_not_apply(tmp_path: Path) -> None:
    assert_bad_input(
        ["convert", "hornet-tiny-gf", "--arch", "hornet-tiny-gf", "-o", str(tmp_path / "o")],
        "--arch is for checkpoint files",
    )
    assert_bad_input(
        ["convert", "llama-tiny", "--image-size", "224", "-o", str(tmp_path / "o")],
        "--image-size applies to HorNet models only",
    )
    assert_bad_input(
        ["convert", "hornet-tiny-gf", "--dtype", "float16", "-o", str(tmp_path / "o")],
        "float32 only",
    )
    assert_bad_input(
        ["convert", "hornet-tiny-gf", "--image-size", "16", "-o", str(tmp_path / "o")],
        "--image-size 16: must be in [32, 2048]",
    )
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def preset_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hornet-tiny-7x7's weights (seed 0) as a checkpoint file: the same model either way."""
    ckpt = tmp_path_factory.mktemp("h7") / "h7.pth"
    torch.save(load_source("hornet-tiny-7x7").model.state_dict(), ckpt)
    return ckpt


@pytest.fixture(scope="module")
def from_checkpoint(preset_weights: Path) -> Path:
    out = preset_weights.parent / "from_checkpoint"
    args = ["--arch", "hornet-tiny-7x7", "-o", str(out), "--image-size", "64", "-q"]
    code, _, err = run("convert", str(preset_weights), *args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def from_preset(from_checkpoint: Path) -> Path:
    """What `convert hornet-tiny-7x7` writes: the same graph, recorded as the preset (copied and
    re-recorded rather than exported a second time, which takes twenty seconds)."""
    out = from_checkpoint.parent / "from_preset"
    shutil.copytree(from_checkpoint, out)
    manifest = json.loads((out / "lmexport.json").read_text())
    digest = manifest["source"]["weights_sha256"]
    record = {"kind": "preset", "name": "hornet-tiny-7x7", "seed": 0, "weights_sha256": digest}
    (out / "lmexport.json").write_text(json.dumps({**manifest, "source": record}))
    return out


@pytest.mark.slow
def test_verify_source_preset_or_checkpoint_either_way(
    preset_weights: Path, from_checkpoint: Path, from_preset: Path
) -> None:
    """A preset `--source` on a folder converted from a checkpoint was refused ("--arch is for
    checkpoint files"), and a checkpoint `--source` on a preset's folder asked for --arch, which
    verify does not take: a checkpoint has the folder's architecture, a preset its own."""
    for folder, source in ((from_checkpoint, "hornet-tiny-7x7"), (from_preset, preset_weights)):
        code, text, err = run("verify", str(folder), "--source", str(source))
        assert code == 0, text + err
        assert "source_weights" in text and "4 of 4 checks passed" in text, text


@pytest.mark.slow
def test_verify_source_of_another_shape(from_checkpoint: Path, tmp_path: Path) -> None:
    """A source of another class count crashed in numpy with a broadcasting traceback."""
    model = HorNet(variant_config("tiny-7x7", 10))
    init_random(model, 1)
    ten = tmp_path / "ten.pth"
    torch.save(model.state_dict(), ten)
    words = ("ten.pth", "num_classes is 10", "says 1000", "another shape")
    assert_bad_input(["verify", str(from_checkpoint), "--source", str(ten)], *words)
    words = ("hornet-tiny-gf", "variant is tiny-gf", "says tiny-7x7")
    assert_bad_input(["verify", str(from_checkpoint), "--source", "hornet-tiny-gf"], *words)
    with pytest.raises(lmexport.LmexportError, match="num_classes is 10"):
        lmexport.verify(from_checkpoint, source=str(ten))
