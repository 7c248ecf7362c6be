"""The one preprocessing: image file -> letterboxed model input, and the map back.

Used by calibration, parity and the on-device runner alike (``calibration`` re-exports it), so
the three can never disagree. Depends on numpy and Pillow only.

An image of any mode Pillow reads becomes 3-channel RGB (grayscale, palette, RGBA, LA, 16-bit,
CMYK...; alpha is dropped, not composited, and the conversion is logged once per mode). It is
resized with its aspect kept so that its longer side equals the model size, then padded at the
bottom and right with the normalisation mean, which is what torchvision's padding of the
normalised tensor amounts to. The model input is float32 RGB in [0, 1], NCHW; mean/std
normalisation happens inside the backbone graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
_modes_seen: set[str] = set()


class ImageReadError(Exception):
    """An image file cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed in the model input: ``model = original * scale``."""

    scale: float
    orig_h: int
    orig_w: int
    size: int

    @property
    def new_h(self) -> int:
        return min(self.size, max(1, round(self.orig_h * self.scale)))

    @property
    def new_w(self) -> int:
        return min(self.size, max(1, round(self.orig_w * self.scale)))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB, whatever its mode; raise ImageReadError if unreadable."""
    path = Path(path)
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, source=str(path))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: cannot read image ({err}); remove or replace it") from err


def to_rgb(im: Image.Image, source: str = "<image>") -> np.ndarray:
    """Any Pillow image as HxWx3 uint8 RGB."""
    if im.mode != "RGB":
        if im.mode not in _modes_seen:
            _modes_seen.add(im.mode)
            log.info("converting %s-mode images to RGB (first: %s)", im.mode, source)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(im, dtype=np.float64)
            hi = arr.max() if arr.size and arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA")
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"{source}: decoded to shape {arr.shape}, expected HxWx3")
    return arr


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """HxWx3 uint8 RGB -> (1x3xSxS float32 in [0, 1], placement)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    box = Letterbox(scale=scale, orig_h=h, orig_w=w, size=size)
    if (box.new_h, box.new_w) != (h, w):
        resized = np.asarray(
            Image.fromarray(image).resize((box.new_w, box.new_h), Image.BILINEAR), dtype=np.uint8
        )
    else:
        resized = image
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[...] = np.asarray(MEAN, dtype=np.float32)
    canvas[: box.new_h, : box.new_w] = resized.astype(np.float32) / 255.0
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None]), box


def boxes_to_original(boxes: np.ndarray, box: Letterbox) -> np.ndarray:
    """Boxes (N,4) xyxy in model coordinates -> original image coordinates, clipped."""
    out = boxes.astype(np.float32) / box.scale
    out[:, 0::2] = np.clip(out[:, 0::2], 0, box.orig_w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, box.orig_h)
    return out
