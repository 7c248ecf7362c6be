"""Image sets maskedge reads: COCO instance annotations with an image folder, or a plain folder.

Reads ``annotations.json`` (COCO instances) and the images it names, or every image under a
folder (recursively; hidden files and folders are ignored). Writes nothing, except
:func:`write_pseudo_labelled_coco`, which writes the COCO file it is given.

A COCO file is checked and cleaned once, when :class:`CocoInstances` is built, before anything
trains on it or is measured against it; pycocotools then indexes the cleaned copy, and
evaluation (``pipeline.evaluate``) scores against that same copy. What is done, and counted in
:class:`DataQuality` (which goes into the build report):

- the file itself: unreadable or malformed JSON, a top level that is not an object, missing or
  mistyped ``images`` / ``categories``, image or category entries without an integer ``id``,
  duplicate ids -> :class:`~pipeline.errors.DatasetError` naming the file and the entry;
- images: a missing, unreadable or non-image file, or one whose size differs from the
  ``width``/``height`` recorded for it, is skipped with a warning (``strict=True``: an error);
  a missing ``width``/``height`` is read from the file; a ``file_name`` with a folder prefix
  that the image folder does not have is found by its base name;
- annotations (each problem names the annotation id, the first few are logged one by one and
  the rest summarised; the set keeps loading):
  ``bbox`` is COCO's ``[x, y, w, h]`` and is converted to ``[x0, y0, x1, y1]`` once, in
  :meth:`CocoInstances.target`; a box with zero or negative width or height is dropped
  (``zero_size_box``), a box partly outside its image is clipped to it (``box_clipped``), one
  wholly outside is dropped (``box_outside_image``); a box is computed from the mask if missing;
  polygons need at least 3 points (6 numbers, an even count, finite, within one image size of
  the image): a bad polygon part is removed (``polygon_part_removed``), an annotation left
  without any is dropped (``bad_polygon``) - pycocotools would read a 4-number polygon as a box;
  a flat polygon list is wrapped (``polygon_wrapped``); RLE masks, compressed (``counts`` a
  string) or not (a list of run lengths), must have the image's size and runs that cover it
  exactly (``bad_rle``); a segmentation-less annotation gets its box as its mask
  (``mask_from_box``; mask AP on it is against a rectangle); ``area`` is filled from the mask
  when missing; an annotation whose mask is empty is dropped (``empty_mask``); unknown image or
  category ids, and malformed entries, are dropped; missing or duplicate annotation ids are
  renumbered;
- ``iscrowd: 1`` regions (polygons or RLE, compressed or not) are decoded by pycocotools, kept
  for evaluation, where COCO treats them as ignore regions, and never become training targets;
- images without annotations stay in the set as negatives, with targets of shape (0, 4) /
  (0,) / (0, H, W), unless ``keep_negatives=False``.

Masks are decoded by pycocotools only. The one thing checked by hand is that a compressed RLE's
runs add up to its image size: pycocotools 2.0.x decodes shorter runs into uninitialised memory.

Training labels are contiguous, 1..K, in the order of the file's sorted category ids, or in the
order of ``category_ids`` when given (e.g. a teacher's own ids, so that its predictions map back
to the user's categories).

Images are decoded through the one preprocessing (:mod:`maskedge_runner.preprocess`), so every
mode Pillow reads becomes RGB; a file that does not decode is skipped with a warning and a count
(:meth:`CocoInstances.check_images`, :func:`read_images`), or stops the build under ``strict``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskedge_runner.preprocess import IMAGE_SUFFIXES, ImageReadError, load_image
from pipeline.errors import DatasetError

log = logging.getLogger(__name__)

LOGGED_PER_REASON = 3  # problems logged one by one per reason; the rest go into the summary
EXAMPLES_PER_REASON = 10  # example ids kept per reason in DataQuality


@dataclass
class DataQuality:
    """What was read, and what was dropped, repaired or skipped and why: for the build report."""

    source: str = ""
    images: int = 0
    images_skipped: int = 0
    annotations: int = 0
    negatives: int = 0
    crowd: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[Any]] = field(default_factory=dict)

    def note(self, kind: str, reason: str, example: Any, message: str) -> None:
        """Count one problem (``kind`` is dropped, repaired or skipped) and log the first few."""
        counter: Counter[str] = getattr(self, kind)
        counter[reason] += 1
        if kind == "skipped":
            self.images_skipped += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES_PER_REASON:
            seen.append(example)
        if counter[reason] <= LOGGED_PER_REASON:
            log.warning("%s: %s", self.source, message)

    def summary(self) -> str:
        parts = [f"{self.images} images", f"{self.annotations} annotations"]
        if self.negatives:
            parts.append(f"{self.negatives} images without objects kept as negatives")
        if self.crowd:
            parts.append(f"{self.crowd} crowd regions (evaluation only)")
        for kind in ("dropped", "repaired", "skipped"):
            counter: Counter[str] = getattr(self, kind)
            if counter:
                detail = ", ".join(
                    f"{reason} {n}"
                    + (f" (e.g. {self.examples[reason][:5]})" if self.examples.get(reason) else "")
                    for reason, n in sorted(counter.items())
                )
                what = "images" if kind == "skipped" else "annotations"
                parts.append(f"{kind} {sum(counter.values())} {what}: {detail}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "images": self.images,
            "images_skipped": self.images_skipped,
            "images_skipped_by_reason": dict(self.skipped),
            "negatives": self.negatives,
            "annotations": self.annotations,
            "crowd": self.crowd,
            "annotations_dropped": dict(self.dropped),
            "annotations_repaired": dict(self.repaired),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


def _as_int(value: Any) -> int | None:
    """An integer id, or None: bools and non-integral numbers are not ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _finite_numbers(values: Any) -> list[float] | None:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        return None
    out = [float(v) for v in values]
    return out if all(math.isfinite(v) for v in out) else None


def _compressed_rle_total(counts: str) -> int | None:
    """Sum of the runs of a compressed COCO RLE string, or None if it is malformed.

    Mirrors pycocotools' ``rleFrString`` only to check the runs; decoding stays with pycocotools.
    """
    total, runs, p = 0, [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0 or x >= 2**32:
            return None
        runs.append(x)
        total += x
    return total


def read_categories(annotation_file: Path | str) -> list[tuple[int, str]]:
    """``(id, name)`` of every category in a COCO file, sorted by id."""
    path = Path(annotation_file)
    data = _read_json(path)
    return [(c, name) for c, name in sorted(_categories(data, path).items())]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"{path}: cannot read the annotation file as UTF-8 text ({err})"
        ) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "expected a COCO instances file"
        ) from err
    except RecursionError as err:
        raise DatasetError(f"{path}: JSON nested too deeply to be a COCO file") from err
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: the top level is a JSON {type(data).__name__}, expected an object with "
            "'images', 'annotations' and 'categories'"
        )
    return data


def _entries(data: dict[str, Any], key: str, path: Path, required: bool) -> list[Any]:
    if key not in data:
        if required:
            raise DatasetError(
                f"{path}: no '{key}' list; a COCO instances file has 'images', 'annotations' and "
                "'categories'"
            )
        return []
    value = data[key]
    if not isinstance(value, list):
        raise DatasetError(f"{path}: '{key}' is a {type(value).__name__}, expected a list")
    return value


def _categories(data: dict[str, Any], path: Path) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, cat in enumerate(_entries(data, "categories", path, required=True)):
        cat_id = _as_int(cat.get("id")) if isinstance(cat, dict) else None
        if cat_id is None:
            raise DatasetError(f"{path}: categories[{i}] has no integer 'id' ({cat!r:.80})")
        if cat_id in cats:
            raise DatasetError(f"{path}: category id {cat_id} appears twice; ids must be unique")
        name = cat.get("name")
        cats[cat_id] = name if isinstance(name, str) and name else f"category_{cat_id}"
    if not cats:
        raise DatasetError(f"{path}: 'categories' is empty; list the classes that are annotated")
    return cats


class CocoInstances:
    """A COCO instance-segmentation set: ``annotations.json`` plus an image folder.

    ``image_ids`` are the usable images (sorted); ``target(id)`` the training target of one;
    ``coco`` the cleaned pycocotools index that evaluation scores against; ``quality`` what was
    dropped, repaired or skipped and why.
    """

    def __init__(
        self,
        annotation_file: Path | str,
        image_dir: Path | str,
        *,
        category_ids: Sequence[int] | None = None,
        keep_negatives: bool = True,
        strict: bool = False,
    ) -> None:
        from pycocotools.coco import COCO

        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.strict = strict
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found")
        data = _read_json(self.annotation_file)
        self.quality = DataQuality(source=str(self.annotation_file))

        file_cats = _categories(data, self.annotation_file)
        self._set_labels(file_cats, category_ids)
        images = self._clean_images(_entries(data, "images", self.annotation_file, True))
        if "annotations" not in data:
            log.warning(
                "%s: no 'annotations' list; every image is a negative", self.annotation_file
            )
        annotations = self._clean_annotations(
            _entries(data, "annotations", self.annotation_file, False), images
        )
        categories = [
            {"id": c, "name": self.class_names[i]} for i, c in enumerate(self.category_ids)
        ]

        self.coco = COCO()
        self.coco.dataset = {
            "images": list(images.values()),
            "annotations": annotations,
            "categories": categories,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        positives = {a["image_id"] for a in annotations if not a["iscrowd"]}
        self.quality.crowd = sum(1 for a in annotations if a["iscrowd"])
        self.quality.annotations = len(annotations)
        self.quality.negatives = sum(1 for i in images if i not in positives)
        if keep_negatives:
            self.image_ids = sorted(images)
        else:
            self.image_ids = sorted(positives)
            log.info(
                "%s: leaving out %d images without objects (keep_negatives=False)",
                self.annotation_file,
                len(images) - len(positives),
            )
        self.quality.images = len(self.image_ids)
        if not self.image_ids:
            raise DatasetError(
                f"{self.annotation_file}: no usable images ({self.quality.summary()})"
            )
        problems = (self.quality.dropped, self.quality.repaired, self.quality.skipped)
        level = logging.WARNING if any(problems) else logging.INFO
        log.log(level, "%s: %s", self.annotation_file, self.quality.summary())

    # -- construction ---------------------------------------------------------------------------

    def _set_labels(self, file_cats: dict[int, str], category_ids: Sequence[int] | None) -> None:
        if category_ids is None:
            ids = sorted(file_cats)
        else:
            ids = [int(c) for c in category_ids]
            if len(set(ids)) != len(ids) or not ids:
                raise DatasetError(f"category_ids={ids}: give each model category id once")
            missing = sorted(set(file_cats) - set(ids))
            if missing:
                log.warning(
                    "%s: categories %s are not among the model's %s; their annotations are dropped",
                    self.annotation_file,
                    missing,
                    ids,
                )
        self.category_ids = ids
        self.class_names = [file_cats.get(c, f"category_{c}") for c in ids]
        # contiguous training labels 1..K <-> the file's own category ids
        self.cat_to_label = {c: i + 1 for i, c in enumerate(ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(ids)}

    def _skip_image(self, reason: str, file: str, message: str) -> None:
        if self.strict:
            raise DatasetError(
                f"{self.annotation_file}: {message} (strict: stopping; without "
                "strict it is skipped)"
            )
        self.quality.note("skipped", reason, file, f"skipping {message}")

    def _clean_images(self, entries: list[Any]) -> dict[int, dict[str, Any]]:
        from PIL import Image

        path = self.annotation_file
        images: dict[int, dict[str, Any]] = {}
        for i, entry in enumerate(entries):
            image_id = _as_int(entry.get("id")) if isinstance(entry, dict) else None
            if image_id is None:
                raise DatasetError(f"{path}: images[{i}] has no integer 'id' ({entry!r:.80})")
            if image_id in images:
                raise DatasetError(f"{path}: image id {image_id} appears twice; ids must be unique")
            name = entry.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise DatasetError(f"{path}: image {image_id} has no 'file_name' string")
            file = self._find_file(name)
            if file is None:
                self._skip_image(
                    "image_missing", name, f"image {image_id}: {self.image_dir / name} not found"
                )
                continue
            try:
                with Image.open(file) as im:
                    width, height = im.size
            except Exception as err:  # Pillow raises many kinds for a non-image file
                self._skip_image(
                    "image_unreadable",
                    name,
                    f"image {image_id}: {file} is not a readable image ({err})",
                )
                continue
            w, h = _as_int(entry.get("width")), _as_int(entry.get("height"))
            if w is None or h is None or w <= 0 or h <= 0:
                w, h = width, height
                self.quality.repaired["image_size_from_file"] += 1
            if (w, h) != (width, height):
                hint = (
                    "; width and height are swapped, as when a tool applied EXIF rotation"
                    if (w, h) == (height, width)
                    else ""
                )
                self._skip_image(
                    "size_mismatch",
                    name,
                    f"image {image_id}: {file} is {width}x{height} but the "
                    f"annotations say {w}x{h}{hint}",
                )
                continue
            images[image_id] = {
                "id": image_id,
                "file_name": str(file.relative_to(self.image_dir))
                if file.is_relative_to(self.image_dir)
                else str(file),
                "width": width,
                "height": height,
            }
        return images

    def _find_file(self, name: str) -> Path | None:
        file = self.image_dir / name
        if file.is_file():
            return file
        alt = self.image_dir / Path(name.replace("\\", "/")).name
        if alt.is_file():
            self.quality.repaired["file_name_by_base_name"] += 1
            return alt
        return None

    def _clean_annotations(
        self, entries: list[Any], images: dict[int, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        used_ids: set[int] = set()
        for i, ann in enumerate(entries):
            if not isinstance(ann, dict):
                self.quality.note(
                    "dropped",
                    "malformed_annotation",
                    f"#{i}",
                    f"annotations[{i}] is a {type(ann).__name__}, not an object; dropped",
                )
                continue
            ann_id = _as_int(ann.get("id"))
            label = f"annotation {ann_id}" if ann_id is not None else f"annotations[{i}] (no id)"
            cleaned = self._clean_annotation(
                ann, label, ann_id if ann_id is not None else f"#{i}", images
            )
            if cleaned is None:
                continue
            if ann_id is None or ann_id in used_ids:
                ann_id = None
            cleaned["id"] = ann_id
            if ann_id is not None:
                used_ids.add(ann_id)
            out.append(cleaned)
        next_id = max(used_ids, default=0) + 1
        for ann in out:
            if ann["id"] is None:
                ann["id"] = next_id
                next_id += 1
                self.quality.repaired["annotation_id_assigned"] += 1
        return out

    def _clean_annotation(
        self, ann: dict[str, Any], label: str, example: Any, images: dict[int, dict[str, Any]]
    ) -> dict[str, Any] | None:
        from pycocotools import mask as mask_utils

        def drop(reason: str, why: str) -> None:
            self.quality.note("dropped", reason, example, f"{label}: {why}; dropped")

        image_id, cat_id = _as_int(ann.get("image_id")), _as_int(ann.get("category_id"))
        if image_id is None or cat_id is None:
            drop("malformed_annotation", "'image_id' and 'category_id' must be integers")
            return None
        if image_id not in images:
            drop("unknown_image", f"image id {image_id} is not a usable image of this set")
            return None
        if cat_id not in self.cat_to_label:
            drop("unknown_category", f"category id {cat_id} is not in {self.category_ids}")
            return None
        crowd = ann.get("iscrowd", 0)
        if crowd is None:
            crowd = 0
        if _as_int(crowd) is None:
            drop("malformed_annotation", f"'iscrowd' is {crowd!r:.20}, expected 0 or 1")
            return None
        crowd = int(bool(_as_int(crowd)))
        h, w = images[image_id]["height"], images[image_id]["width"]

        bbox = None
        if ann.get("bbox") is not None:
            bbox = _finite_numbers(ann["bbox"])
            if bbox is None or len(bbox) != 4:
                drop("bad_bbox", f"bbox {ann['bbox']!r:.60} is not 4 finite numbers [x, y, w, h]")
                return None
            if bbox[2] <= 0 or bbox[3] <= 0:
                drop("zero_size_box", f"bbox {ann['bbox']} has zero or negative width/height")
                return None

        segm = self._clean_segmentation(ann.get("segmentation"), label, example, h, w)
        if segm is False:
            return None
        if segm is None:
            if bbox is None:
                drop("no_box_or_mask", "neither a bbox nor a segmentation")
                return None
            x0, y0 = min(max(0.0, bbox[0]), w), min(max(0.0, bbox[1]), h)
            x1, y1 = min(max(0.0, bbox[0] + bbox[2]), w), min(max(0.0, bbox[1] + bbox[3]), h)
            segm = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            self.quality.note(
                "repaired",
                "mask_from_box",
                example,
                f"{label}: no segmentation; its box is used as its mask",
            )
        rle = self._rle(segm, h, w)
        area = float(mask_utils.area(rle))
        if area <= 0:
            drop("empty_mask", "its mask covers no pixel of the image")
            return None
        if bbox is None:
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            self.quality.repaired["bbox_from_mask"] += 1

        x0, y0 = max(0.0, bbox[0]), max(0.0, bbox[1])
        x1, y1 = min(float(w), bbox[0] + bbox[2]), min(float(h), bbox[1] + bbox[3])
        if x1 <= x0 or y1 <= y0:
            drop("box_outside_image", f"bbox {bbox} lies outside its {w}x{h} image")
            return None
        if (x0, y0, x1, y1) != (bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]):
            self.quality.note(
                "repaired",
                "box_clipped",
                example,
                f"{label}: bbox {bbox} reaches outside its {w}x{h} image; clipped",
            )
        given_area = ann.get("area")
        if (
            isinstance(given_area, (int, float))
            and not isinstance(given_area, bool)
            and math.isfinite(given_area)
            and given_area > 0
        ):
            area = float(given_area)
        else:
            self.quality.repaired["area_from_mask"] += 1
        return {
            "image_id": image_id,
            "category_id": cat_id,
            "iscrowd": crowd,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": area,
            "segmentation": segm,
        }

    def _clean_segmentation(
        self, segm: Any, label: str, example: Any, h: int, w: int
    ) -> list[list[float]] | dict[str, Any] | None | bool:
        """The segmentation in a form pycocotools decodes safely; None if absent; False: drop."""
        quality = self.quality
        if segm is None or segm == [] or segm == {}:
            return None
        if isinstance(segm, dict):
            return self._clean_rle(segm, label, example, h, w)
        if not isinstance(segm, list):
            quality.note(
                "dropped",
                "bad_segmentation",
                example,
                f"{label}: segmentation is a {type(segm).__name__}; dropped",
            )
            return False
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in segm):
            segm = [segm]
            quality.note(
                "repaired",
                "polygon_wrapped",
                example,
                f"{label}: a flat polygon list; read as one polygon",
            )
        kept: list[list[float]] = []
        margin = float(max(h, w))
        for part in segm:
            coords = _finite_numbers(part)
            problem = None
            if coords is None:
                problem = f"polygon {part!r:.60} is not a list of finite numbers"
            elif len(coords) < 6 or len(coords) % 2:
                problem = (
                    f"polygon {part!r:.60} has {len(coords)} numbers; a polygon needs an "
                    "even count of at least 6 (3 points)"
                )
            elif (
                min(coords[0::2]) < -margin
                or max(coords[0::2]) > w + margin
                or min(coords[1::2]) < -margin
                or max(coords[1::2]) > h + margin
            ):
                problem = f"polygon reaches far outside its {w}x{h} image"
            if problem is None:
                kept.append(coords)
            elif len(segm) > 1:
                quality.note(
                    "repaired",
                    "polygon_part_removed",
                    example,
                    f"{label}: {problem}; that part removed",
                )
            else:
                quality.note("dropped", "bad_polygon", example, f"{label}: {problem}; dropped")
                return False
        if not kept:
            quality.note(
                "dropped", "bad_polygon", example, f"{label}: no usable polygon left; dropped"
            )
            return False
        return kept

    def _clean_rle(
        self, segm: dict[str, Any], label: str, example: Any, h: int, w: int
    ) -> dict[str, Any] | bool:
        def bad(why: str) -> bool:
            self.quality.note("dropped", "bad_rle", example, f"{label}: RLE {why}; dropped")
            return False

        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and [_as_int(v) for v in size] == [h, w]):
            return bad(f"size {size!r:.30} is not its image's [height, width] = [{h}, {w}]")
        if isinstance(counts, list):
            if not all(_as_int(c) is not None and _as_int(c) >= 0 for c in counts):
                return bad("counts are not non-negative integers")
            if sum(int(c) for c in counts) != h * w:
                return bad(f"runs add up to {sum(int(c) for c in counts)}, not {h}x{w}={h * w}")
            return {"size": [h, w], "counts": [int(c) for c in counts]}
        if isinstance(counts, str):
            total = _compressed_rle_total(counts)
            if total is None:
                return bad("counts string is not a compressed COCO RLE")
            if total != h * w:
                return bad(f"runs add up to {total}, not {h}x{w}={h * w}")
            return {"size": [h, w], "counts": counts}
        return bad(f"counts is a {type(counts).__name__}, expected a string or a list")

    @staticmethod
    def _rle(segm: list[list[float]] | dict[str, Any], h: int, w: int) -> dict[str, Any]:
        from pycocotools import mask as mask_utils

        if isinstance(segm, list):
            return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        if isinstance(segm["counts"], list):
            return mask_utils.frPyObjects(segm, h, w)
        return segm

    # -- use ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> np.ndarray:
        """HxWx3 uint8 RGB; DatasetError (naming the file) if it does not decode."""
        try:
            return load_image(self.image_path(image_id))
        except ImageReadError as err:
            raise DatasetError(
                f"{err} (image {image_id} of {self.annotation_file}; run check_images() first to "
                "skip unreadable images)"
            ) from err

    def check_images(self) -> int:
        """Decode every image once; skip (or, strict, stop at) those that fail. Returns skipped."""
        kept = []
        for image_id in self.image_ids:
            try:
                load_image(self.image_path(image_id))
                kept.append(image_id)
            except ImageReadError as err:
                self._skip_image(
                    "image_unreadable", self.coco.imgs[image_id]["file_name"], str(err)
                )
        skipped = len(self.image_ids) - len(kept)
        if skipped:
            log.warning(
                "%s: skipped %d of %d images that could not be decoded",
                self.annotation_file,
                skipped,
                len(self.image_ids),
            )
        self.image_ids = kept
        self.quality.images = len(kept)
        if not kept:
            raise DatasetError(f"{self.annotation_file}: none of its images could be decoded")
        return skipped

    def target(self, image_id: int) -> dict[str, np.ndarray]:
        """Training target: boxes (N,4) xyxy float32, labels (N,) int64, masks (N,H,W) uint8.

        Crowd regions are left out; an image without objects gives (0,4), (0,), (0,H,W).
        """
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann["iscrowd"]:
                continue
            x, y, bw, bh = ann["bbox"]
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.cat_to_label[ann["category_id"]])
            masks.append(self.coco.annToMask(ann))
        return {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "masks": np.asarray(masks, dtype=np.uint8).reshape(-1, h, w),
        }


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_images(folder: Path | str) -> list[Path]:
    """Every image file under ``folder``, recursively, in a stable order.

    Suffixes are matched case-insensitively; hidden files and folders (``.DS_Store``, macOS
    ``._*`` resource forks, ``.ipynb_checkpoints``) are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "not found"
        raise DatasetError(f"{folder}: image folder {what}")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and _visible(p, folder)
    )
    if not files:
        raise DatasetError(
            f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)"
        )
    return files


def usable_images(
    paths: Iterable[Path], strict: bool = False, quality: DataQuality | None = None
) -> list[Path]:
    """The paths among ``paths`` that decode, each decoded once and not kept in memory.

    Unreadable files are skipped with a warning and counted in ``quality`` (or, strict, raise),
    as :func:`read_images` does.
    """
    return read_images(paths, strict=strict, quality=quality, keep=False)[0]


def read_images(
    paths: Iterable[Path],
    strict: bool = False,
    quality: DataQuality | None = None,
    keep: bool = True,
) -> tuple[list[Path], list[np.ndarray]]:
    """Decode images; unreadable ones are skipped with a warning and counted (or, strict, raise).

    Returns the paths that decoded and their HxWx3 uint8 RGB arrays, in order (no arrays when
    ``keep`` is False).
    """
    paths = list(paths)
    quality = quality if quality is not None else DataQuality(source="images")
    kept, arrays = [], []
    for path in paths:
        try:
            array = load_image(path)
            if keep:
                arrays.append(array)
            kept.append(Path(path))
        except ImageReadError as err:
            if strict:
                raise DatasetError(
                    f"{err} (strict: stopping; without strict it is skipped)"
                ) from err
            quality.note("skipped", "image_unreadable", str(path), f"skipping {err}")
    quality.images += len(kept)
    if len(kept) < len(paths):
        log.warning(
            "skipped %d of %d images that could not be read", len(paths) - len(kept), len(paths)
        )
    if not kept and paths:
        raise DatasetError(f"none of the {len(paths)} images could be read (first: {paths[0]})")
    return kept, arrays


def write_pseudo_labelled_coco(
    predict: Any,
    images: CocoInstances,
    categories: Sequence[tuple[int, str]],
    out_file: Path | str,
    *,
    threshold: float = 0.5,
    limit: int | None = None,
) -> dict[str, int]:
    """Write a COCO file labelling ``images`` with a model's own detections (pseudo-labels).

    ``predict`` maps an HxWx3 uint8 image to detections in its coordinates (``boxes`` xyxy,
    ``scores``, contiguous ``labels`` 1..K, ``masks`` HxW probabilities), as the evaluation
    predictors do; label ``i`` becomes ``categories[i-1]`` (``(category id, name)``). Kept: the
    detections scoring at least ``threshold`` whose mask, thresholded at 0.5, is not empty; masks
    are stored as compressed RLE (pycocotools). The first ``limit`` images only, when given.

    This is the validation reference when no labelled set with the model's classes exists: AP
    against it measures agreement with that model, not accuracy. Returns image and annotation
    counts.
    """
    from pycocotools import mask as mask_utils

    image_ids = images.image_ids[:limit] if limit else list(images.image_ids)
    entries, annotations = [], []
    for image_id in image_ids:
        info = images.coco.imgs[image_id]
        entries.append(
            {
                "id": image_id,
                "file_name": info["file_name"],
                "width": info["width"],
                "height": info["height"],
            }
        )
        det = predict(images.load_image(image_id))
        for j in range(len(det.scores)):
            label = int(det.labels[j])
            if det.scores[j] < threshold or not 1 <= label <= len(categories):
                continue
            mask = np.asfortranarray((det.masks[j] > 0.5).astype(np.uint8))
            if not mask.any():
                continue
            rle = mask_utils.encode(mask)
            x0, y0, x1, y1 = (float(v) for v in det.boxes[j])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(categories[label - 1][0]),
                    "bbox": [x0, y0, max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)],
                    "area": float(mask_utils.area(rle)),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "iscrowd": 0,
                    "score": float(det.scores[j]),
                }
            )
    document = {
        "info": {
            "description": f"pseudo-labels (score >= {threshold}) on {images.annotation_file}"
        },
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": int(c), "name": n} for c, n in categories],
    }
    Path(out_file).write_text(json.dumps(document))
    log.info(
        "%s: %d pseudo-labels (score >= %g) on %d images of %s",
        out_file,
        len(annotations),
        threshold,
        len(entries),
        images.annotation_file,
    )
    return {"images": len(entries), "annotations": len(annotations)}
