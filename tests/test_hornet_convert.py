"""HorNet end to end: official-style checkpoints through `convert`, parity of every tiny and small
variant (and a GF model at 384) through `verify`, `classify` on images, and bad input.

Each export of a real variant takes tens of seconds on two cores, so every folder is converted
once per module and only checked by the tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import lmexport
from lmexport.errors import RuntimeInputError
from lmexport.models.hornet import HorNet, init_random, variant_config
from lmexport.runtime import ImageClassifier
from lmexport.verify import Report

from helpers import assert_bad_input, run

pytestmark = pytest.mark.slow
FP32_TOL = 1e-4


def training_checkpoint(model: HorNet, path: Path) -> Path:
    """What the official training script's `save_model` writes: weights under "model", with the
    optimizer, loss-scaler state, epoch and the argparse namespace of the run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    args = argparse.Namespace(model="hornet_tiny_gf", input_size=224, drop_path=0.2, lr=4e-3)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": 299,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 17},
            "args": args,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def gf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = HorNet(variant_config("tiny-gf"))
    init_random(model, 7)
    return training_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "hornet_tiny_gf.pth")


@pytest.fixture(scope="module")
def gf_folder(gf_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gf") / "out"
    code, text, err = run("convert", str(gf_checkpoint), "--arch", "hornet-tiny-gf", "-o", str(out))
    assert code == 0, err
    assert "wrote" in text
    return out


@pytest.fixture(scope="module")
def tiny_7x7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lmexport.convert("hornet-tiny-7x7", tmp_path_factory.mktemp("t7") / "out")


def assert_parity(report: Report) -> None:
    """fp32: logits within 1e-4 (absolute, or relative where logits are large), top-1 identical,
    at batch 1 and batch 3."""
    assert report.passed, report.table()
    logits = {k: v for k, v in report.metrics.items() if k.startswith("logits")}
    assert any(k.startswith("logits_b1_") for k in logits)
    assert any(k.startswith("logits_b3_") for k in logits)
    for m in logits.values():
        assert min(float(m["max_abs"]), float(m["relative"])) <= FP32_TOL
        assert m["top1"] == 1.0


def test_training_checkpoint_converts(gf_folder: Path, gf_checkpoint: Path) -> None:
    manifest = json.loads((gf_folder / "lmexport.json").read_text())
    assert manifest["arch"] == "hornet" and manifest["target"] == "ort"
    config = manifest["config"]
    assert config["variant"] == "tiny-gf" and config["image_size"] == 224
    assert config["gf_sizes"] == [None, None, [14, 8], [7, 4]]
    assert config["dims"] == [64, 128, 256, 512] and config["orders"] == [2, 3, 4, 5]
    assert manifest["inputs"] == [
        {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}
    ]
    assert manifest["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 1000]}]
    source = manifest["source"]
    assert source["kind"] == "checkpoint" and source["arch"] == "hornet-tiny-gf"
    assert source["path"] == str(gf_checkpoint.resolve())
    assert manifest["passes"]["export"]["global_filters_as_matmuls"] == 20
    assert manifest["passes"]["export"]["BiasGelu"] == 25  # every block's MLP
    assert manifest["preprocess"]["resize"] == 256


def test_checkpoint_parity_through_cli(gf_folder: Path, tmp_path: Path) -> None:
    code, text, err = run("verify", str(gf_folder), "--json", str(tmp_path / "v.json"))
    assert code == 0, text + err
    assert "hornet_tiny_gf.pth" in text
    checks = {c["name"]: c for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["source_weights"]["passed"]
    assert set(checks) == {"source_weights", "logits_b1_224x224", "logits_b3_224x224"}


def test_tiny_7x7_parity_any_size(tiny_7x7: Path) -> None:
    manifest = json.loads((tiny_7x7 / "lmexport.json").read_text())
    assert manifest["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["config"]["image_size"] is None
    report = lmexport.verify(tiny_7x7)
    assert_parity(report)
    assert "logits_b2_144x88" in report.metrics  # not square, not the exported size


@pytest.mark.parametrize(
    "preset,target",
    [
        ("hornet-small-7x7", "ort"),
        ("hornet-small-gf", "ort"),
        ("hornet-tiny-gf-384", "ort"),
        ("hornet-tiny-gf", "plain"),  # the global filters as onnxruntime DFT ops
        ("hornet-tiny-gf", "onnx"),  # standard ops only
    ],
)
def test_variant_parity(preset: str, target: str, tmp_path: Path) -> None:
    out = lmexport.convert(preset, tmp_path / "out", target=target)
    report = lmexport.verify(out)
    assert_parity(report)
    if target == "onnx":
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    if preset.endswith("384"):
        assert "logits_b3_384x384" in report.metrics


def write_png(path: Path) -> Path:
    ramp = np.linspace(0, 255, 300, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:200, None], 128.0), -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def test_classify_prints_top_k(gf_folder: Path, tmp_path: Path) -> None:
    image = write_png(tmp_path / "ramp.png")
    (gf_folder / "labels.txt").write_text("".join(f"label {i}\n" for i in range(1000)))
    try:
        code, text, err = run("classify", str(gf_folder), str(image), "--top", "3")
        classifier = ImageClassifier.load(gf_folder)
        best = classifier.predict(classifier.load_image(image), top=3)[0]
    finally:
        (gf_folder / "labels.txt").unlink()
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0] == f"{image}:" and len(lines) == 4
    for line, prediction in zip(lines[1:], best, strict=True):
        assert line.endswith(f"{prediction.index:>5}  label {prediction.index}")
    assert best[0].probability >= best[1].probability >= best[2].probability


def test_classify_7x7_at_another_size(tiny_7x7: Path, tmp_path: Path) -> None:
    image = write_png(tmp_path / "ramp.png")
    code, text, err = run("classify", str(tiny_7x7), str(image), "--image-size", "160")
    assert code == 0, err
    assert "class " in text and len(text.splitlines()) == 6


@pytest.mark.parametrize("width_height", [(517, 400), (400, 517), (300, 300)])
def test_preprocess_as_torchvision(tiny_7x7: Path, width_height: tuple[int, int]) -> None:
    """Resize(256) then CenterCrop(224) as torchvision computes them (the official evaluation):
    short side 256, long side int(256 · long / short) truncated (517x400 → 330x256, not 331)."""
    rng = np.random.default_rng(0)
    width, height = width_height
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    short = min(width, height)
    size = (256 * width // short, 256 * height // short)
    left, top = round((size[0] - 224) / 2.0), round((size[1] - 224) / 2.0)
    crop = image.resize(size, Image.Resampling.BICUBIC).crop((left, top, left + 224, top + 224))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((np.asarray(crop) / 255.0 - mean) / std).transpose(2, 0, 1)
    pixels = ImageClassifier.load(tiny_7x7).preprocess(image)
    assert pixels.shape == (3, 224, 224)
    assert np.abs(pixels - expected).max() < 1e-5


def test_classify_size_has_a_ceiling(tiny_7x7: Path, tmp_path: Path) -> None:
    """--image-size 100000 was allocated (24 GB) until the kernel killed the process."""
    image = write_png(tmp_path / "ramp.png")
    assert_bad_input(
        ["classify", str(tiny_7x7), str(image), "--image-size", "100000"], "at most 2048"
    )


def test_gf_refuses_another_size(gf_folder: Path, tmp_path: Path) -> None:
    image = write_png(tmp_path / "ramp.png")
    assert_bad_input(
        ["classify", str(gf_folder), str(image), "--image-size", "256"], "224x224", "256x256"
    )
    with pytest.raises(RuntimeInputError, match="exported for 224x224"):
        ImageClassifier.load(gf_folder).logits(np.zeros((1, 3, 256, 256), np.float32))


def test_imagenet_22k_checkpoint_converts_and_verifies(tmp_path: Path) -> None:
    """HorNet-L's official checkpoints have a 21841-way head: `convert` takes the class count from
    it, and `verify`, rebuilding the model from the checkpoint, does too. Labels only name
    classes: ImageNet-1K's beside a 22K model stop `classify`, not `verify`."""
    model = HorNet(variant_config("tiny-7x7", num_classes=21841))
    init_random(model, 3)
    ckpt = tmp_path / "hornet_in22k.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "out"
    code, _, err = run("convert", str(ckpt), "--arch", "hornet-tiny-7x7", "-o", str(out))
    assert code == 0, err
    manifest = json.loads((out / "lmexport.json").read_text())
    assert manifest["config"]["num_classes"] == 21841
    assert manifest["outputs"][0]["shape"] == ["batch", 21841]
    (out / "labels.txt").write_text("".join(f"label {i}\n" for i in range(1000)))
    code, text, err = run("verify", str(out))
    assert code == 0, text + err
    image = write_png(tmp_path / "ramp.png")
    assert_bad_input(["classify", str(out), str(image)], "labels.txt", "1000 lines", "21841")


def test_labels_with_a_byte_order_mark(tiny_7x7: Path) -> None:
    (tiny_7x7 / "labels.txt").write_text("".join(f"label {i}\n" for i in range(1000)), "utf-8-sig")
    try:
        labels = ImageClassifier.load(tiny_7x7).labels
    finally:
        (tiny_7x7 / "labels.txt").unlink()
    assert labels is not None and labels[0] == "label 0"


def test_decompression_bomb_is_one_line(
    tiny_7x7: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow refuses an image of more than twice MAX_IMAGE_PIXELS with DecompressionBombError,
    no OSError; a small limit stands in for a 20000x10000 image."""
    image = write_png(tmp_path / "bomb.png")  # 300x200
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert_bad_input(["classify", str(tiny_7x7), str(image)], "bomb.png", "too many pixels")


def test_16_bit_grayscale_scaled_to_8_bits(tiny_7x7: Path, tmp_path: Path) -> None:
    """convert("RGB") clips 16-bit values at 255: a 16-bit ramp became nearly white. Scaled by
    1/257 and rounded (v · 257 - 100 → v, not v - 1), it matches the 8-bit ramp, whether Pillow
    opens it as I;16 (PNG) or I (16-bit PGM)."""
    ramp = np.tile(np.arange(256, dtype=np.int32), (64, 1))
    Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / "gray8.png")
    wide = np.maximum(ramp * 257 - 100, 0)
    Image.fromarray(wide.astype(np.uint16)).save(tmp_path / "gray16.png")
    pgm = b"P5\n256 64\n65535\n" + wide.astype(">u2").tobytes()
    (tmp_path / "gray16.pgm").write_bytes(pgm)
    classifier = ImageClassifier.load(tiny_7x7)
    expected = classifier.load_image(tmp_path / "gray8.png")
    for name, mode in (("gray16.png", "I;16"), ("gray16.pgm", "I")):
        with Image.open(tmp_path / name) as opened:
            assert opened.mode == mode
        assert np.array_equal(classifier.load_image(tmp_path / name), expected), name


def test_float_and_32_bit_images_refused(tiny_7x7: Path, tmp_path: Path) -> None:
    """Floats and integers past 16 bits have no one scale to 8 bits: refused, the mode named."""
    values = np.full((64, 64), 70000.0, dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tiff")
    assert_bad_input(["classify", str(tiny_7x7), str(tmp_path / "float.tiff")], "mode F")
    with pytest.raises(RuntimeInputError, match="mode I image with values outside 0-65535"):
        ImageClassifier.load(tiny_7x7).preprocess(Image.fromarray(values.astype(np.int32)))


def test_not_an_image(gf_folder: Path, tmp_path: Path) -> None:
    fake = tmp_path / "photo.png"
    fake.write_text("not a picture")
    assert_bad_input(["classify", str(gf_folder), str(fake)], "photo.png", "not an image")
