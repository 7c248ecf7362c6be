"""Image sets maskedge reads: COCO instance annotations with an image folder, or a plain folder.

COCO masks are decoded by pycocotools (polygons, compressed and uncompressed RLE); boxes are
converted once from COCO's ``[x, y, w, h]`` to ``[x0, y0, x1, y1]``. Annotations with a zero-area
box or mask are dropped before training with a warning and a count; ``iscrowd`` regions are kept
out of training targets (COCO evaluation treats them as ignore regions). Images without
annotations stay in the set as negatives with targets of shape (0, 4) / (0,).

Images are read through the one preprocessing (:mod:`maskedge_runner.preprocess`), so every mode
Pillow reads becomes RGB.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maskedge_runner.preprocess import IMAGE_SUFFIXES, ImageReadError, load_image
from pipeline.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass
class DataQuality:
    """What was read, and what was dropped and why: goes into the build report."""

    images: int = 0
    images_skipped: int = 0
    annotations: int = 0
    dropped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"images": self.images, "images_skipped": self.images_skipped,
                "annotations": self.annotations, "annotations_dropped": dict(self.dropped)}


class CocoInstances:
    """A COCO instance-segmentation set: ``annotations.json`` plus an image folder."""

    def __init__(self, annotation_file: Path, image_dir: Path) -> None:
        from pycocotools.coco import COCO

        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if not self.annotation_file.is_file():
            raise DatasetError(f"{self.annotation_file}: annotation file not found")
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(self.annotation_file))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DatasetError(
                f"{self.annotation_file}: not a COCO instances file ({err}); expected 'images', "
                "'annotations' and 'categories'"
            ) from err
        self.image_ids = sorted(self.coco.imgs)
        self.category_ids = sorted(self.coco.cats)
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        # contiguous training labels 1..K <-> the file's own category ids
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.category_ids)}
        self.quality = DataQuality(images=len(self.image_ids))

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> np.ndarray:
        return load_image(self.image_path(image_id))

    def target(self, image_id: int) -> dict[str, np.ndarray]:
        """Training target: boxes (N,4) xyxy float32, labels (N,) int64, masks (N,H,W) uint8."""
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = ann["bbox"]
            if bw <= 0 or bh <= 0:
                self.quality.dropped["zero_size_box"] += 1
                continue
            mask = self.coco.annToMask(ann)
            if mask.sum() == 0:
                self.quality.dropped["empty_mask"] += 1
                continue
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.cat_to_label[ann["category_id"]])
            masks.append(mask)
        return {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "masks": np.asarray(masks, dtype=np.uint8).reshape(-1, h, w),
        }


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(
            f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)"
        )
    return files


def read_images(paths: list[Path], strict: bool = False) -> tuple[list[Path], list[np.ndarray]]:
    """Decode images; unreadable ones are skipped with a warning (or raise under ``strict``)."""
    kept, arrays = [], []
    for path in paths:
        try:
            arrays.append(load_image(path))
            kept.append(path)
        except ImageReadError as err:
            if strict:
                raise DatasetError(str(err)) from err
            log.warning("skipping %s", err)
    if len(kept) < len(paths):
        log.warning("skipped %d of %d images that could not be read", len(paths) - len(kept),
                    len(paths))
    return kept, arrays
