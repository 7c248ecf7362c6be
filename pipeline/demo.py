"""The embedded demo: a seeded synthetic instance-segmentation set written in COCO format.

Nothing can be downloaded where maskedge runs, so the default input is generated here. Each image
is a cluttered background (crops of scikit-image's bundled photographs, tinted, plus random
strokes and blobs that belong to no class) with 1-6 objects of three classes:

    1 ``disk``      ellipses of varied aspect
    2 ``block``     rotated rectangles
    3 ``wedge``     triangles

Objects vary in size (about 18-110 px on a 256 px image), colour, texture (flat, striped or
photo-textured) and aspect, and later objects partly occlude earlier ones; an object less than
35 % visible is dropped. Masks are stored as compressed RLE (pycocotools), so the demo goes
through the same COCO loaders as user data.

Writes ``<root>/<split>/images/*.png`` and ``<root>/<split>/annotations.json`` for the splits
``train``, ``calib`` and ``val``. Generation is deterministic for a given seed and size, and a
finished split is marked by ``<root>/<split>/.complete`` so a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

CLASS_NAMES = ("disk", "block", "wedge")
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class DemoSpec:
    """How big each split of the demo set is."""

    image_size: int = 256
    train_images: int = 1200
    calib_images: int = 64
    val_images: int = 100
    seed: int = 0

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_images, "calib": self.calib_images, "val": self.val_images}


def _texture_bank() -> list[np.ndarray]:
    from skimage import data

    names = ["brick", "camera", "grass", "gravel", "moon", "coffee", "chelsea", "rocket",
             "astronaut", "immunohistochemistry", "coins", "text", "clock", "cell"]
    bank = []
    for name in names:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        bank.append(img[..., :3].astype(np.uint8))
    return bank


def _random_crop(rng: np.random.Generator, img: np.ndarray, h: int, w: int) -> np.ndarray:
    ih, iw = img.shape[:2]
    if ih < h or iw < w:
        scale = max(h / ih, w / iw) * 1.05
        img = np.asarray(Image.fromarray(img).resize((int(iw * scale) + 1, int(ih * scale) + 1)))
        ih, iw = img.shape[:2]
    y = int(rng.integers(0, ih - h + 1))
    x = int(rng.integers(0, iw - w + 1))
    return img[y : y + h, x : x + w]


def _background(rng: np.random.Generator, bank: list[np.ndarray], size: int) -> np.ndarray:
    base = _random_crop(rng, bank[int(rng.integers(len(bank)))], size, size).astype(np.float32)
    tint = rng.uniform(0.5, 1.2, size=3)
    base = base * tint * rng.uniform(0.6, 1.0)
    canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    # clutter that belongs to no class: strokes and small blobs
    for _ in range(int(rng.integers(3, 10))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, size=4))
        draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 5))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        cx, cy = (int(v) for v in rng.integers(0, size, size=2))
        r = int(rng.integers(2, 7))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return np.asarray(canvas)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """A boolean mask of one object of class ``cls`` (1-based) somewhere in the image."""
    extent = float(np.exp(rng.uniform(np.log(18), np.log(110))))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    w, h = extent * np.sqrt(aspect), extent / np.sqrt(aspect)
    cx = rng.uniform(0.1, 0.9) * size
    cy = rng.uniform(0.1, 0.9) * size
    angle = rng.uniform(0, np.pi)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if cls == 1:
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([w / 2 * np.cos(t), h / 2 * np.sin(t)], axis=1)
    elif cls == 2:
        pts = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    else:
        apex = rng.uniform(-0.5, 0.5) * w
        pts = np.array([[-w / 2, h / 2], [w / 2, h / 2], [apex, -h / 2]])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts.tolist()], fill=1)
    return np.asarray(img, dtype=bool)


def _fill(rng: np.random.Generator, bank: list[np.ndarray], size: int) -> np.ndarray:
    colour = rng.integers(0, 256, size=3).astype(np.float32)
    kind = int(rng.integers(3))
    if kind == 0:
        return np.broadcast_to(colour, (size, size, 3)).copy()
    if kind == 1:
        period = rng.uniform(4, 14)
        yy, xx = np.mgrid[0:size, 0:size]
        theta = rng.uniform(0, np.pi)
        wave = 0.5 + 0.5 * np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        other = rng.integers(0, 256, size=3).astype(np.float32)
        return colour * wave[..., None] + other * (1 - wave[..., None])
    tex = _random_crop(rng, bank[int(rng.integers(len(bank)))], size, size).astype(np.float32)
    return 0.5 * tex + 0.5 * colour


def _render_image(
    rng: np.random.Generator, bank: list[np.ndarray], size: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    image = _background(rng, bank, size).astype(np.float32)
    objects: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, 7))):
        cls = int(rng.integers(1, len(CLASS_NAMES) + 1))
        mask = _shape_mask(rng, cls, size)
        if mask.sum() < 120:
            continue
        fill = _fill(rng, bank, size)
        shade = rng.uniform(0.75, 1.1)
        image[mask] = np.clip(fill[mask] * shade, 0, 255)
        objects = [(c, m & ~mask) for c, m in objects]
        objects.append((cls, mask))
    noise = rng.normal(0, rng.uniform(2, 8), size=image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, objects


def _generate_split(root: Path, split: str, count: int, spec: DemoSpec) -> None:
    from pycocotools import mask as mask_utils

    out = root / split
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}/{split}".encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    bank = _texture_bank()
    images, annotations = [], []
    ann_id = 1
    for index in range(count):
        image, objects = _render_image(rng, bank, spec.image_size)
        name = f"{split}_{index:05d}.png"
        Image.fromarray(image).save(img_dir / name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": spec.image_size,
                       "width": spec.image_size})
        for cls, mask in objects:
            full_area = None
            area = int(mask.sum())
            if area < 40:
                continue
            full_area = full_area or area
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": cls, "segmentation": rle,
                "area": float(area), "bbox": [x, y, w, h], "iscrowd": 0,
            })
            ann_id += 1
    coco = {
        "info": {"description": "maskedge synthetic demo", "generator_version": GENERATOR_VERSION,
                 "spec": asdict(spec), "split": split},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CLASS_NAMES)],
    }
    tmp = out / "annotations.json.tmp"
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, out / "annotations.json")
    (out / ".complete").write_text(json.dumps({"spec": asdict(spec), "count": count}))
    log.info("demo split %s: %d images, %d objects -> %s", split, count, len(annotations), out)


def ensure_demo_data(root: Path, spec: DemoSpec = DemoSpec()) -> dict[str, Path]:
    """Generate (or reuse) the demo splits under ``root``; return each split's folder."""
    splits = {}
    for split, count in spec.split_sizes().items():
        out = root / split
        marker = out / ".complete"
        expected = {"spec": asdict(spec), "count": count}
        if not (marker.exists() and json.loads(marker.read_text()) == expected):
            _generate_split(root, split, count, spec)
        splits[split] = out
    return splits
