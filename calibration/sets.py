"""Calibration image sets, their manifests, and the graph inputs captured from them.

A calibration set is chosen from a folder of images (searched recursively) or a COCO set (default:
the demo's ``calib`` split). Selection is deterministic: candidate paths are sorted, and when
there are more than ``count`` a seeded sample of them is taken (the seed is recorded). Every
chosen file is decoded once to make sure it is usable (unreadable files are skipped with a
warning and counted) and hashed (SHA-256 of its bytes). The manifest records the images, their
hashes, a hash of the whole set (the image hashes in order plus the preprocessing), the seed and
the preprocessing, so a build can say exactly what it was calibrated on and a cache can key on it.

:func:`collect_graph_inputs` runs the FP32 engine over the images with its ``capture`` hook and
keeps what each static graph was fed: the letterboxed image for the backbone and the RoIAlign-pooled
features of real proposals (box head) and real detections (mask head). The heads are therefore
calibrated on the features they will see, not on random tensors.

Reads: the images (and the COCO annotation file, for a COCO set). Writes: nothing.

Known limits: fewer than ``min_images`` images (default 32) is allowed but warned about and
recorded, since INT8 ranges from a handful of images may not represent deployment images (B11);
so are byte-identical copies (the manifest gives the distinct count) and blank, single-colour
images; beyond that, nothing checks that the images resemble deployment images. The mask head is
calibrated only on the detections the FP32 model makes: images with none add nothing, and the
count is recorded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskedge_runner.preprocess import MEAN, STD, ImageReadError, load_image
from pipeline.cache import hash_json, sha256_file
from pipeline.datasets import CocoInstances, list_images
from pipeline.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

MIN_IMAGES = 32
BLANK_STD = 2.0  # an image whose pixels vary less than this (0-255) is blank for calibration
MIN_MASK_ROIS = 32
GRAPHS = ("backbone", "box_head", "mask_head")


@dataclass(frozen=True)
class CalibrationImage:
    """One chosen image: its file, COCO id (None for a folder set) and SHA-256 of its bytes."""

    path: Path
    sha256: str
    image_id: int | None = None


@dataclass(frozen=True)
class CalibrationSet:
    """A deterministic selection of calibration images and how they are preprocessed."""

    source: str  # "folder", "coco" or "paths"
    root: Path
    images: tuple[CalibrationImage, ...]
    image_size: int
    seed: int
    requested: int | None  # at most this many images were asked for (None: all)
    min_images: int
    available: int
    skipped_unreadable: int
    blank: tuple[Path, ...] = ()  # images of (nearly) one colour

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[np.ndarray]:
        """The images as HxWx3 uint8 RGB arrays, in order (decoded one at a time)."""
        for item in self.images:
            yield load_image(item.path)

    @property
    def below_minimum(self) -> bool:
        return len(self.images) < self.min_images

    def preprocessing(self) -> dict[str, Any]:
        return preprocessing_spec(self.image_size)

    @property
    def set_sha256(self) -> str:
        """Hash of the set: every image's bytes, in order, and the preprocessing."""
        payload = {"images": [i.sha256 for i in self.images], "preprocessing": self.preprocessing()}
        return hash_json(payload)

    @property
    def distinct(self) -> int:
        """Images with different bytes (copies of one file calibrate like one image)."""
        return len({i.sha256 for i in self.images})

    @property
    def warnings(self) -> list[str]:
        """Why this set may not represent deployment images (B11), for the manifest and report."""
        warnings = []
        if self.below_minimum:
            warnings.append(
                f"only {len(self.images)} calibration images (< {self.min_images}); INT8 ranges "
                "may not represent deployment images"
            )
        warnings += [w for w in (self.copies_warning, self.blank_warning) if w]
        if self.skipped_unreadable:
            warnings.append(f"{self.skipped_unreadable} unreadable image(s) skipped")
        return warnings

    @property
    def copies_warning(self) -> str | None:
        if self.distinct == len(self.images):
            return None
        return (
            f"{len(self.images) - self.distinct} of the {len(self.images)} calibration images are "
            f"byte-identical copies of others: {self.distinct} distinct images"
        )

    @property
    def blank_warning(self) -> str | None:
        if not self.blank:
            return None
        return (
            f"{len(self.blank)} of the {len(self.images)} calibration images are blank (pixel "
            f"std < {BLANK_STD:g}, e.g. {self.blank[0].name}); they add no range information - "
            "calibrate on images like the deployment's"
        )

    @property
    def manifest(self) -> dict[str, Any]:
        """Plain data for the bundle manifest and the stage cache key."""
        return {
            "source": self.source,
            "root": str(self.root),
            "count": len(self.images),
            "available": self.available,
            "skipped_unreadable": self.skipped_unreadable,
            "selection": (
                "all, sorted by path"
                if self.requested is None or self.available <= self.requested
                else f"seeded sample of {self.requested}, sorted by path"
            ),
            "seed": self.seed,
            "requested": self.requested,
            "min_images": self.min_images,
            "below_minimum": self.below_minimum,
            "distinct": self.distinct,
            "blank": len(self.blank),
            "set_sha256": self.set_sha256,
            "preprocessing": self.preprocessing(),
            "images": [
                {"path": _relative(i.path, self.root), "image_id": i.image_id, "sha256": i.sha256}
                for i in self.images
            ],
            "warnings": self.warnings,
        }


def preprocessing_spec(image_size: int) -> dict[str, Any]:
    """The one preprocessing (``maskedge_runner.preprocess.letterbox``), described as data."""
    return {
        "size": image_size,
        "color": "RGB (any Pillow mode converted; alpha dropped)",
        "resize": "letterbox: longer side to size, aspect kept, Pillow bilinear",
        "pad": "bottom/right, with the normalisation mean",
        "input": "float32 NCHW in [0, 1]",
        "mean": list(MEAN),
        "std": list(STD),
        "normalisation": "inside the backbone graph",
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _select(
    candidates: list[tuple[Path, int | None]], count: int | None, seed: int
) -> list[tuple[Path, int | None]]:
    """All candidates in path order, or a seeded sample of ``count`` of them in path order."""
    candidates = sorted(candidates, key=lambda c: c[0].as_posix())
    if count is None or len(candidates) <= count:
        return candidates
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(candidates), size=count, replace=False).tolist())
    return [candidates[i] for i in chosen]


def _build(
    source: str,
    root: Path,
    candidates: list[tuple[Path, int | None]],
    *,
    image_size: int,
    count: int | None,
    seed: int,
    min_images: int,
    strict: bool,
) -> CalibrationSet:
    if count is not None and count < 1:
        raise ConfigError(f"calibration count={count} must be >= 1 (or None for all images)")
    if image_size < 32:
        raise ConfigError(f"calibration image_size={image_size} is not a model input size")
    images = []
    skipped = 0
    blank = []
    for path, image_id in _select(candidates, count, seed):
        try:
            pixels = load_image(path)
        except ImageReadError as err:
            if strict:
                raise DatasetError(f"calibration: {err}") from err
            log.warning("calibration: skipping %s", err)
            skipped += 1
            continue
        if float(pixels.std()) < BLANK_STD:
            blank.append(path)
        images.append(CalibrationImage(path=path, sha256=sha256_file(path), image_id=image_id))
    if not images:
        raise DatasetError(
            f"{root}: none of the {len(candidates)} candidate calibration images could be read; "
            "point the calibration set at a folder of readable images"
        )
    result = CalibrationSet(
        source=source,
        root=root,
        images=tuple(images),
        image_size=image_size,
        seed=seed,
        requested=count,
        min_images=min_images,
        available=len(candidates),
        skipped_unreadable=skipped,
        blank=tuple(blank),
    )
    for warning in (result.copies_warning, result.blank_warning):
        if warning:
            log.warning("calibration set %s: %s", root, warning)
    if result.below_minimum:
        log.warning(
            "calibration set %s has %d image(s), fewer than the %d recommended: INT8 ranges from "
            "so few images may not represent deployment images (the count is recorded in the "
            "manifest); give a larger, representative set if parity suffers",
            root,
            len(images),
            min_images,
        )
    log.info(
        "calibration set: %d of %d images from %s (seed %d), sha256 %s",
        len(images),
        len(candidates),
        root,
        seed,
        result.set_sha256[:12],
    )
    return result


def build_calibration_set(
    paths: Sequence[Path],
    *,
    image_size: int,
    count: int | None = 64,
    seed: int = 0,
    min_images: int = MIN_IMAGES,
    strict: bool = False,
) -> CalibrationSet:
    """A calibration set chosen from ``paths`` (e.g. ``pipeline.datasets.list_images(folder)``).

    At most ``count`` images (a seeded sample when there are more); unreadable files are skipped
    with a warning, or raise :class:`DatasetError` under ``strict``.
    """
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        raise DatasetError("no calibration images given; point the calibration set at images")
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return _build(
        "paths",
        root,
        [(p, None) for p in paths],
        image_size=image_size,
        count=count,
        seed=seed,
        min_images=min_images,
        strict=strict,
    )


def calibration_set_from_folder(
    folder: Path,
    *,
    image_size: int,
    count: int | None = 64,
    seed: int = 0,
    min_images: int = MIN_IMAGES,
    strict: bool = False,
) -> CalibrationSet:
    """Calibration images found recursively under ``folder`` (suffixes as the runner reads)."""
    folder = Path(folder)
    paths = list_images(folder)
    return _build(
        "folder",
        folder,
        [(p, None) for p in paths],
        image_size=image_size,
        count=count,
        seed=seed,
        min_images=min_images,
        strict=strict,
    )


def calibration_set_from_coco(
    annotation_file: Path,
    image_dir: Path,
    *,
    image_size: int,
    count: int | None = 64,
    seed: int = 0,
    min_images: int = MIN_IMAGES,
    strict: bool = False,
) -> CalibrationSet:
    """Calibration images of a COCO set (annotations are not needed, only the image list)."""
    data = CocoInstances(Path(annotation_file), Path(image_dir))
    candidates = [(data.image_path(i), int(i)) for i in data.image_ids]
    missing = [p for p, _ in candidates if not p.is_file()]
    if missing:
        log.warning(
            "calibration: %d image file(s) listed in %s are missing (first: %s)",
            len(missing),
            annotation_file,
            missing[0],
        )
        candidates = [c for c in candidates if c[0].is_file()]
    if not candidates:
        raise DatasetError(
            f"{annotation_file}: no image files of this COCO set exist under {image_dir}"
        )
    return _build(
        "coco",
        Path(image_dir),
        candidates,
        image_size=image_size,
        count=count,
        seed=seed,
        min_images=min_images,
        strict=strict,
    )


def demo_calibration_set(
    demo_root: Path,
    *,
    image_size: int,
    count: int | None = 64,
    seed: int = 0,
    min_images: int = MIN_IMAGES,
) -> CalibrationSet:
    """The default: the ``calib`` split of the embedded demo set under ``demo_root``."""
    from pipeline.demo import ensure_demo_data

    split = ensure_demo_data(Path(demo_root))["calib"]
    return calibration_set_from_coco(
        split / "annotations.json",
        split / "images",
        image_size=image_size,
        count=count,
        seed=seed,
        min_images=min_images,
    )


def _as_array(image: np.ndarray | CalibrationImage | Path | str) -> np.ndarray:
    if isinstance(image, CalibrationImage):
        return load_image(image.path)
    if isinstance(image, (str, Path)):
        return load_image(image)
    return image


def collect_graph_inputs(
    engine: Any,
    images: Iterable[np.ndarray | CalibrationImage | Path | str],
    *,
    min_mask_rois: int = MIN_MASK_ROIS,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """What each static graph is fed when the FP32 ``engine`` runs over ``images``.

    ``engine`` is a :class:`maskedge_runner.engine.Engine` (its ``capture`` hook is used and
    restored); ``images`` are HxWx3 uint8 arrays, image files, a :class:`CalibrationSet` or its
    ``images``. Returns ``{"backbone": [...], "box_head": [...], "mask_head": [...]}``, one input
    dict per graph call: the letterboxed image, the pooled RoI features of the proposals, and
    those of the detections. Images without proposals or detections add no head samples.
    """
    captured: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in GRAPHS}

    def capture(graph: str, inputs: dict[str, np.ndarray]) -> None:
        captured.setdefault(graph, []).append(
            {k: np.array(v, copy=True) for k, v in inputs.items()}
        )

    previous = engine.capture
    engine.capture = capture
    count = 0
    try:
        for image in images:
            engine.predict(_as_array(image))
            count += 1
    finally:
        engine.capture = previous
    if count == 0:
        raise DatasetError("no calibration images were given to collect graph inputs from")

    rows = {g: sum(next(iter(s.values())).shape[0] for s in v) for g, v in captured.items()}
    log.info(
        "captured graph inputs from %d images: backbone %d, box head %d RoIs, mask "
        "head %d RoIs (%d images with detections)",
        count,
        len(captured["backbone"]),
        rows["box_head"],
        rows["mask_head"],
        len(captured["mask_head"]),
    )
    if rows["mask_head"] < min_mask_rois:
        log.warning(
            "the mask head gets only %d calibration RoIs (detections) from %d images, fewer than "
            "%d; its INT8 ranges rest on little data - add images with objects the model detects",
            rows["mask_head"],
            count,
            min_mask_rois,
        )
    return captured


def graph_inputs_summary(inputs: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, Any]:
    """Counts of captured inputs per graph, for the manifest."""
    return {
        graph: {
            "samples": len(samples),
            "rows": int(sum(next(iter(s.values())).shape[0] for s in samples)),
            "shapes": sorted({str(list(next(iter(s.values())).shape[1:])) for s in samples}),
        }
        for graph, samples in inputs.items()
    }
