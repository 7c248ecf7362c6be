"""The one preprocessing: image file -> letterboxed model input, and the map back.

Used by calibration, parity and the on-device runner alike (``calibration`` re-exports it), so
the three can never disagree. Depends on numpy, Pillow and the standard library only.

Reading (:func:`load_image`): every mode Pillow reads becomes 3-channel uint8 RGB, and the first
image of each mode is logged (INFO) with the rule applied:

- ``1``, ``L``, ``P``, ``RGBX``, ``YCbCr``, ``HSV``, ``LAB``, ``CMYK``: Pillow's own conversion
  (Adobe-inverted CMYK JPEGs are handled by Pillow's decoder; ICC profiles are not applied, as in
  the training pipelines that read images with ``Image.open(...).convert("RGB")``);
- ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and palette images with transparency: the colour is
  kept and alpha is dropped, not composited (what ``convert("RGB")`` does in training code);
- 16-bit grayscale (``I;16*``): scaled by bit depth (65535 -> 255), not stretched per image;
  ``I`` (32-bit integer): 8- or 16-bit data by its range, else min-max scaled; ``F`` (float):
  [0, 1] or [0, 255] by its range, else min-max scaled (NaN -> 0).

A file that does not decode completely (truncated, corrupt, not an image, a decompression bomb,
a mode that cannot become RGB) raises :class:`ImageReadError` naming the file; truncated images
are never padded with grey, whatever ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says elsewhere.
Callers decide whether to skip such a file (with a warning and a count) or stop.

Known limits: EXIF orientation is not applied (COCO annotations and torchvision training use the
stored pixel grid); animated or multi-page files give their first frame.

Model input (:func:`letterbox`): resized with its aspect kept so that its longer side equals the
model size, then padded at the bottom and right with the normalisation mean, which is what
torchvision's padding of the normalised tensor amounts to. The model input is float32 RGB in
[0, 1], NCHW; mean/std normalisation happens inside the backbone graph.
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
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


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
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder; give one image file")
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")

    # Decoding is third-party code fed untrusted bytes: Pillow's plugins raise OSError,
    # ValueError, SyntaxError, struct.error, EOFError, IndexError... for corrupt files, so any
    # exception while decoding means "this file is unreadable".
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except Exception as err:
        raise ImageReadError(
            f"{path}: cannot read image ({type(err).__name__}: {err}); remove or replace it"
        ) from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok

    return to_rgb(image, source=str(path))


def _gray_to_uint8(im: Image.Image) -> tuple[np.ndarray, str]:
    """A single-channel high-depth image as uint8, with the rule used."""
    arr = np.asarray(im)
    if im.mode in _SIXTEEN_BIT:
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8), "16-bit scaled by bit depth"
    data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.round(data * 255.0).astype(np.uint8), "float in [0, 1] scaled to 0-255"
    if lo >= 0.0 and hi <= 255.0:
        return np.round(data).astype(np.uint8), "8-bit range kept"
    if im.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        return np.round(data * 255.0 / 65535.0).astype(np.uint8), "16-bit range scaled"
    span = hi - lo if hi > lo else 1.0
    return np.round((data - lo) * 255.0 / span).astype(np.uint8), "min-max scaled"


def to_rgb(im: Image.Image, source: str = "<image>") -> np.ndarray:
    """Any Pillow image as HxWx3 uint8 RGB; raise ImageReadError if its mode cannot be."""
    mode = im.mode
    rule = "Pillow's conversion"
    try:
        if mode in _SIXTEEN_BIT or mode in ("I", "F"):
            gray, rule = _gray_to_uint8(im)
            im = Image.fromarray(gray, "L")
        elif mode == "P" and "transparency" in im.info:
            im, rule = im.convert("RGBA"), "palette with transparency; alpha dropped"
        elif mode == "La":
            # premultiplied luminance: Pillow converts it to nothing, so un-premultiply here
            la = np.asarray(im).astype(np.float64)
            alpha = np.maximum(la[..., 1], 1.0)
            gray = np.clip(np.round(la[..., 0] * 255.0 / alpha), 0, 255).astype(np.uint8)
            im, rule = Image.fromarray(gray, "L"), "premultiplied alpha removed and dropped"
        elif mode in _ALPHA:
            rule = "alpha dropped, not composited"
        if im.mode != "RGB":
            im = im.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageReadError(
            f"{source}: cannot convert a {mode}-mode image to RGB ({err}); save it as RGB or "
            "grayscale"
        ) from err
    if mode != "RGB" and mode not in _modes_seen:
        _modes_seen.add(mode)
        log.info("converting %s-mode images to RGB (%s; first: %s)", mode, rule, source)

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
