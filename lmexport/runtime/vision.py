"""Running an exported HorNet folder: image preprocessing, logits, top-K classes.

Preprocessing follows the folder's `lmexport.json` (`preprocess`: ImageNet evaluation as the
official release does it). Images are decoded with Pillow, imported only when an image is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LmexportError, RuntimeInputError, first_line
from .manifest import MODEL_FILE, read_manifest
from .session import create_session

LABELS_FILE = "labels.txt"  # one class name a line, in class order
MIN_SIZE = 32  # four downsamplings, by 4, 2, 2 and 2
# Far past any HorNet evaluation (384): a 100000-pixel side would ask for hundreds of GB.
MAX_SIZE = 2048
MEAN = [0.485, 0.456, 0.406]  # ImageNet
STD = [0.229, 0.224, 0.225]
# 16-bit grayscale as Pillow opens it: `I;16*` (PNG, TIFF), or `I` (16-bit PGM) holding 0-65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def preprocessing(image_size: int) -> dict[str, Any]:
    """ImageNet evaluation as the official HorNet release does it: below 384, a bicubic resize of
    the shorter side to image_size / 0.875 and a centre crop; at 384 and above, a bicubic resize
    to the square. `resize` is an int (the shorter side) or [height, width] (exactly)."""
    resize: int | list[int] = (
        [image_size, image_size] if image_size >= 384 else int(image_size / 0.875)
    )
    return {
        "image_size": image_size,
        "resize": resize,
        "interpolation": "bicubic",
        "mean": MEAN,
        "std": STD,
    }


@dataclass
class Prediction:
    index: int
    label: str
    probability: float
    logit: float


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise LmexportError("reading images needs Pillow (pip install pillow)") from None
    return Image


def _to_rgb(image: Any, pil: Any) -> Any:
    """An 8-bit RGB copy of `image`. Pillow's convert("RGB") clips wider modes at 255, which turns
    a 16-bit image nearly white: those are scaled to 8 bits first (value / 257, rounded, the
    inverse of 8 → 16 bits' value · 257). 32-bit integers past 16 bits and floats have no one
    scale (0-1, 0-255 or physical units), so they are refused rather than guessed."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise RuntimeInputError(
                f"a mode {image.mode} image with values outside 0-65535 has no known scale to "
                "8 bits; convert it to 8-bit RGB first"
            )
        image = pil.fromarray(np.rint(values / 257.0).astype(np.uint8))
    elif image.mode == "F":
        raise RuntimeInputError(
            "a mode F (32-bit float) image has no known scale to 8 bits; "
            "convert it to 8-bit RGB first"
        )
    return image.convert("RGB")


class ImageClassifier:
    """One onnxruntime session over a HorNet `convert` output folder."""

    def __init__(self, folder: Path, manifest: dict[str, Any], provider: str, threads: int | None):
        if manifest.get("arch") != "hornet":
            raise LmexportError(f"{folder}: holds a {manifest.get('arch')!r} model, not a HorNet")
        self.folder = folder
        self.manifest = manifest
        self.config: dict[str, Any] = manifest["config"]
        self.preprocessing: dict[str, Any] = manifest["preprocess"]
        # The one input size of a global-filter model; None when the graph takes any size.
        self.fixed_size: int | None = self.config.get("image_size")
        self.image_size: int = int(self.preprocessing["image_size"])
        self.num_classes: int = int(self.config["num_classes"])
        self.session = create_session(folder / MODEL_FILE, provider, threads)

    @classmethod
    def load(
        cls, folder: str | Path, provider: str = "cpu", threads: int | None = None
    ) -> ImageClassifier:
        folder = Path(folder)
        return cls(folder, read_manifest(folder), provider, threads)

    @cached_property
    def labels(self) -> list[str] | None:
        """Class names from labels.txt, read when first needed: only naming classes uses them, so
        a wrong labels file does not stop `verify`. utf-8-sig: editors may start it with a BOM."""
        path = self.folder / LABELS_FILE
        if not path.is_file():
            return None
        labels = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
        if len(labels) != self.num_classes:
            raise LmexportError(
                f"{path}: {len(labels)} lines, the model has {self.num_classes} classes"
            )
        return labels

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels is not None else f"class {index}"

    # -- images ---------------------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        if self.fixed_size is not None and (height, width) != (self.fixed_size, self.fixed_size):
            raise RuntimeInputError(
                f"this global-filter model was exported for {self.fixed_size}x{self.fixed_size} "
                f"inputs, not {height}x{width} (convert again with --image-size)"
            )
        if min(height, width) < MIN_SIZE:
            raise RuntimeInputError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels")
        if max(height, width) > MAX_SIZE:
            raise RuntimeInputError(f"images may be at most {MAX_SIZE}x{MAX_SIZE} pixels")

    def preprocess(self, image: Any, image_size: int | None = None) -> np.ndarray:
        """pixel_values [3, S, S] from a Pillow image or an [H, W, 3] uint8 array: 8-bit RGB
        (16-bit grayscale scaled down), resize, centre crop, scale to [0, 1], normalise with the
        ImageNet mean and std."""
        size = self.image_size if image_size is None else image_size
        self._check_size(size, size)
        recipe = self.preprocessing if size == self.image_size else preprocessing(size)
        pil = _pillow()
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise RuntimeInputError("an image array must be [height, width, 3] uint8 RGB")
            image = pil.fromarray(image)
        image = _to_rgb(image, pil)
        resize = recipe["resize"]
        bicubic = pil.Resampling.BICUBIC
        if isinstance(resize, list):
            image = image.resize((resize[1], resize[0]), bicubic)
        else:
            # torchvision's Resize(int), as the official evaluation uses it: the short side
            # becomes `resize`, the long one int(resize · long / short), truncated.
            w, h = image.size
            if w <= h:
                shape = (resize, max(size, int(resize * h / w)))
            else:
                shape = (max(size, int(resize * w / h)), resize)
            image = image.resize(shape, bicubic)
            w, h = image.size
            left, top = round((w - size) / 2), round((h - size) / 2)
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        mean = np.asarray(recipe["mean"], dtype=np.float32)
        std = np.asarray(recipe["std"], dtype=np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1).copy()

    def load_image(self, path: str | Path, image_size: int | None = None) -> np.ndarray:
        """pixel_values [3, S, S] of an image file; a one-line error when it is not an image."""
        path = Path(path)
        pil = _pillow()
        if not path.is_file():
            raise LmexportError(f"{path}: no such image file")
        try:
            with pil.open(path) as image:
                image.load()
                return self.preprocess(image, image_size)
        except pil.DecompressionBombError as e:
            raise LmexportError(f"{path}: refused, too many pixels ({first_line(e)})") from None
        except (pil.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise LmexportError(
                f"{path}: not an image Pillow can read ({type(e).__name__})"
            ) from None

    # -- inference ------------------------------------------------------------------------------

    def logits(self, pixel_values: Any) -> np.ndarray:
        """Logits [batch, classes] of pixel_values [batch, 3, H, W] (or one image [3, H, W])."""
        x = np.asarray(pixel_values)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] != 3:
            raise RuntimeInputError(
                f"pixel_values must be [batch, 3, height, width], got {x.shape}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise RuntimeInputError(f"pixel_values must be floating point, got {x.dtype}")
        self._check_size(x.shape[2], x.shape[3])
        feeds = {"pixel_values": np.ascontiguousarray(x, dtype=np.float32)}
        return self.session.run(None, feeds)[0]

    def predict(self, pixel_values: Any, top: int = 5) -> list[list[Prediction]]:
        """The `top` classes of each image, most probable first."""
        if top < 1:
            raise RuntimeInputError("top must be at least 1")
        logits = self.logits(pixel_values).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-logits, axis=-1, kind="stable")[:, :top]
        return [
            [Prediction(int(i), self.label(int(i)), float(p[i]), float(row[i])) for i in idx]
            for row, p, idx in zip(logits, probs, order, strict=True)
        ]
