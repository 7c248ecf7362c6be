"""COCO files and image folders as real exports make them, and what maskedge does with each.

Cases from ../shared/cases: B20 (4-number polygon), B23 (xywh boxes, boxes outside the image),
B24 (zero-size boxes), B25 (images without annotations, unlabelled folders), B26 (crowd regions
with uncompressed RLE).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskedge_runner.detections import Detections
from pipeline.datasets import (
    CocoInstances,
    DataQuality,
    list_images,
    read_categories,
    read_images,
    usable_images,
    write_pseudo_labelled_coco,
)
from pipeline.errors import DatasetError

W, H = 64, 48
CATEGORIES = [{"id": 1, "name": "disk"}, {"id": 2, "name": "block"}]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(
    ann_id: int,
    image_id: int = 1,
    bbox: list[float] | None = None,
    segmentation: Any = None,
    category_id: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    bbox = bbox if bbox is not None else [10, 10, 20, 10]
    x, y, w, h = bbox
    if segmentation is None:
        segmentation = [_rect(x, y, x + w, y + h)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "segmentation": segmentation,
        "area": float(w * h),
        "iscrowd": 0,
        **extra,
    }


def _write_image(path: Path, width: int = W, height: int = H, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def _coco(
    root: Path,
    annotations: list[Any],
    images: list[Any] | None = None,
    categories: list[Any] | None = None,
    **top: Any,
) -> tuple[Path, Path]:
    """Write an annotation file and its image folder (images 1 and 2, 64x48, by default)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = [{"id": i, "file_name": f"img{i}.png", "width": W, "height": H} for i in (1, 2)]
    for i, im in enumerate(images):
        if isinstance(im, dict) and isinstance(im.get("file_name"), str):
            file = image_dir / im["file_name"]
            if not file.exists():
                file.parent.mkdir(parents=True, exist_ok=True)
                _write_image(file, seed=i)
    data = {
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES if categories is None else categories,
        **top,
    }
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir


# -- B20 -------------------------------------------------------------------------------------------


def test_b20_polygon_of_two_points_dropped_naming_the_annotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """B20: a polygon of exactly 4 numbers, which pycocotools would read as a box."""
    anns = [_ann(1), _ann(42, segmentation=[[10, 10, 30, 20]]), _ann(3, image_id=2)]
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        data = CocoInstances(*_coco(tmp_path, anns))

    assert "annotation 42" in caplog.text and "4 numbers" in caplog.text
    assert data.quality.dropped == {"bad_polygon": 1}
    assert data.quality.examples["bad_polygon"] == [42]
    assert sorted(data.coco.anns) == [1, 3]
    assert len(data.target(1)["boxes"]) == 1 and len(data.target(2)["boxes"]) == 1


def test_b20_bad_part_of_a_polygon_removed_rest_kept(tmp_path: Path) -> None:
    good = _rect(10, 10, 30, 20)
    anns = [_ann(7, segmentation=[[5, 5, 6, 6], good, [1, 2, 3, 4, 5]])]
    data = CocoInstances(*_coco(tmp_path, anns))

    assert data.quality.repaired["polygon_part_removed"] == 2
    assert data.coco.anns[7]["segmentation"] == [good]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([good], H, W)))
    np.testing.assert_array_equal(data.target(1)["masks"][0], expected)


def test_flat_polygon_list_is_wrapped(tmp_path: Path) -> None:
    data = CocoInstances(*_coco(tmp_path, [_ann(1, segmentation=_rect(10, 10, 30, 20))]))
    assert data.quality.repaired["polygon_wrapped"] == 1
    assert data.target(1)["masks"].sum() > 0


# -- B23 -------------------------------------------------------------------------------------------


def test_b23_xywh_converted_to_xyxy_once(tmp_path: Path) -> None:
    """B23: COCO's [x, y, w, h] becomes [x0, y0, x1, y1] in training targets, and only there."""
    data = CocoInstances(*_coco(tmp_path, [_ann(1, bbox=[10, 5, 20, 15])]))

    target = data.target(1)

    np.testing.assert_array_equal(target["boxes"], np.array([[10, 5, 30, 20]], np.float32))
    assert target["boxes"].dtype == np.float32
    assert data.coco.anns[1]["bbox"] == [10, 5, 20, 15]  # evaluation keeps COCO's convention
    np.testing.assert_array_equal(data.target(1)["boxes"], target["boxes"])  # no drift


def test_b23_boxes_outside_the_image_clipped_or_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    anns = [
        _ann(1, bbox=[50, 40, 30, 30], segmentation=[_rect(50, 40, 63, 47)]),
        _ann(2, bbox=[-5, -5, 10, 10], segmentation=[_rect(0, 0, 5, 5)]),
        _ann(3, bbox=[100, 100, 10, 10], segmentation=[_rect(60, 44, 63, 47)]),
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        data = CocoInstances(*_coco(tmp_path, anns))

    boxes = data.target(1)["boxes"]
    np.testing.assert_array_equal(boxes, np.array([[50, 40, 64, 48], [0, 0, 5, 5]], np.float32))
    assert data.quality.repaired["box_clipped"] == 2
    assert data.quality.dropped == {"box_outside_image": 1}
    assert (
        "annotation 1: bbox [50.0, 40.0, 30.0, 30.0] reaches outside its 64x48 image" in caplog.text
    )


# -- B24 -------------------------------------------------------------------------------------------


def test_b24_zero_size_boxes_dropped_before_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """B24: zero width or height: dropped with a warning and a count, and losses stay finite."""
    from pipeline.models import build_model, student_spec
    from pipeline.train import load_batch

    anns = [
        _ann(1),
        _ann(2, bbox=[10, 10, 0, 5]),
        _ann(3, bbox=[10, 10, 5, 0]),
        _ann(4, image_id=2, bbox=[3, 3, -4, 6]),
        _ann(5, image_id=2, bbox=[30, 20, 12, 12]),
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        data = CocoInstances(*_coco(tmp_path, anns))

    assert data.quality.dropped == {"zero_size_box": 3}
    assert data.quality.examples["zero_size_box"] == [2, 3, 4]
    assert "annotation 2: bbox [10, 10, 0, 5] has zero or negative width/height" in caplog.text
    assert "zero_size_box 3" in data.quality.summary()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(student_spec(num_classes=3, image_size=64)).train()
        images, targets = load_batch(data, [0, 1], step=0, seed=0, device=torch.device("cpu"))
        for t in targets:
            assert bool((t["boxes"][:, 2:] > t["boxes"][:, :2]).all())
        losses = model(images, targets)
    finally:
        torch.set_num_threads(threads)
    assert set(losses) >= {"loss_box_reg", "loss_mask", "loss_objectness"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())


# -- B25 -------------------------------------------------------------------------------------------


def test_b25_images_without_annotations_are_negatives(tmp_path: Path) -> None:
    """B25: kept with targets of shape (0, 4) / (0,) / (0, H, W), or left out by option."""
    files = _coco(tmp_path, [_ann(1)])
    data = CocoInstances(*files)

    target = data.target(2)

    assert data.image_ids == [1, 2]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == np.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == np.int64
    assert target["masks"].shape == (0, H, W) and target["masks"].dtype == np.uint8
    assert data.quality.negatives == 1
    assert CocoInstances(*files, keep_negatives=False).image_ids == [1]


def test_b25_file_without_annotations_list(tmp_path: Path) -> None:
    ann_file, image_dir = _coco(tmp_path, [])
    data_json = json.loads(ann_file.read_text())
    del data_json["annotations"]
    ann_file.write_text(json.dumps(data_json))

    data = CocoInstances(ann_file, image_dir)

    assert data.quality.negatives == 2 and data.quality.annotations == 0
    assert data.target(1)["boxes"].shape == (0, 4)


def test_b25_unlabelled_folder_read_recursively(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _write_image(tmp_path / "z.png")
    _write_image(tmp_path / "a" / "b" / "y.JPG", 40, 30)
    _write_image(tmp_path / ".ipynb_checkpoints" / "x.png")
    (tmp_path / "a" / "._y.jpg").write_bytes(b"\0\5\26\7AppleDouble")  # macOS resource fork
    (tmp_path / "notes.txt").write_text("not an image")

    files = list_images(tmp_path)
    kept, arrays = read_images(files)

    assert files == [tmp_path / "a" / "b" / "y.JPG", tmp_path / "z.png"]
    assert kept == files
    assert [a.shape for a in arrays] == [(30, 40, 3), (H, W, 3)]


def test_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match="no images found"):
        list_images(tmp_path)
    with pytest.raises(DatasetError, match="image folder not found"):
        list_images(tmp_path / "missing")


# -- B26 -------------------------------------------------------------------------------------------


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


@pytest.fixture
def crowd_set(tmp_path: Path) -> tuple[CocoInstances, np.ndarray, np.ndarray]:
    """Image 1: one object (polygon) and one crowd region (uncompressed RLE), same class."""
    crowd = np.zeros((H, W), np.uint8)
    crowd[28:44, 36:60] = 1
    crowd[30:34, 40:44] = 0
    obj = np.zeros((H, W), np.uint8)
    obj[4:20, 4:24] = 1
    rle = mask_utils.encode(np.asfortranarray(obj))
    anns = [
        _ann(
            1, bbox=[4, 4, 20, 16], segmentation={"size": [H, W], "counts": rle["counts"].decode()}
        ),
        _ann(2, bbox=[36, 28, 24, 16], segmentation=_uncompressed_rle(crowd), iscrowd=1),
    ]
    return CocoInstances(*_coco(tmp_path, anns)), obj, crowd


def test_b26_crowd_uncompressed_rle_decoded_and_not_a_training_target(
    crowd_set: tuple[CocoInstances, np.ndarray, np.ndarray],
) -> None:
    """B26: ``iscrowd: 1`` with ``counts`` a list: decoded by pycocotools, never a target."""
    data, obj, crowd = crowd_set

    target = data.target(1)

    np.testing.assert_array_equal(data.coco.annToMask(data.coco.anns[2]), crowd)
    assert data.quality.crowd == 1 and data.quality.dropped == {}
    np.testing.assert_array_equal(target["masks"], obj[None])  # compressed RLE, decoded
    np.testing.assert_array_equal(target["labels"], [1])
    np.testing.assert_array_equal(target["boxes"], [[4, 4, 24, 20]])


def test_b26_crowd_regions_are_ignored_by_evaluation(
    crowd_set: tuple[CocoInstances, np.ndarray, np.ndarray],
) -> None:
    """A crowd region is neither a missed object nor a false positive when detected."""
    from pipeline.evaluate import evaluate_coco

    data, obj, crowd = crowd_set

    def detections(*items: tuple[list[float], float, np.ndarray]) -> Detections:
        return Detections(
            np.array([b for b, _, _ in items], np.float32),
            np.array([s for _, s, _ in items], np.float32),
            np.ones(len(items), np.int64),
            np.stack([m.astype(np.float32) for _, _, m in items]),
        )

    only_object = evaluate_coco(lambda image: detections(([4, 4, 24, 20], 0.9, obj)), data, limit=1)
    crowd_first = evaluate_coco(
        lambda image: detections(([36, 28, 60, 44], 0.95, crowd), ([4, 4, 24, 20], 0.9, obj)),
        data,
        limit=1,
    )

    for metrics in (only_object, crowd_first):
        assert metrics["box_ap"] == pytest.approx(1.0)
        assert metrics["mask_ap"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("segmentation", "why"),
    [
        ({"size": [H, W], "counts": [10, 5]}, "runs add up to 15"),
        ({"size": [H, W], "counts": [H * W - 5, 10]}, "runs add up to"),
        ({"size": [H, W], "counts": "1"}, "runs add up to"),
        ({"size": [H, W], "counts": "\x7f\x7f"}, "not a compressed COCO RLE"),
        ({"size": [10, 10], "counts": [100]}, "is not its image's"),
        ({"size": [H, W], "counts": [-1, H * W + 1]}, "non-negative"),
        ({"size": [H, W], "counts": None}, "counts is a NoneType"),
    ],
)
def test_malformed_rle_dropped_not_decoded(
    tmp_path: Path, segmentation: dict[str, Any], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """pycocotools would decode short runs into uninitialised memory, or overrun the mask."""
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        data = CocoInstances(*_coco(tmp_path, [_ann(1), _ann(9, segmentation=segmentation)]))
    assert data.quality.dropped == {"bad_rle": 1}
    assert "annotation 9" in caplog.text and why in caplog.text


# -- other oddities real exports have --------------------------------------------------------------


def test_annotation_fields_repaired_or_dropped(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(10, 10, 30, 20)]},
        {"image_id": 1, "category_id": 2, "bbox": [40, 5, 10, 10]},  # no id, no mask
        _ann(1, image_id=2),  # duplicate id
        _ann(4, category_id=99),
        _ann(5, image_id=77),
        _ann(6, bbox=[1, 2, "3", 4], segmentation=[_rect(1, 2, 4, 6)]),
        _ann(7, bbox=[1, 2, float("nan"), 4], segmentation=[_rect(1, 2, 4, 6)]),
        _ann(8, segmentation=[_rect(1e30, 0, 5, 5)]),
        "not an annotation",
        {"id": 10, "image_id": 1, "category_id": 1},
    ]
    data = CocoInstances(*_coco(tmp_path, anns))

    q = data.quality
    assert q.dropped == {
        "unknown_category": 1,
        "unknown_image": 1,
        "bad_bbox": 2,
        "bad_polygon": 1,
        "malformed_annotation": 1,
        "no_box_or_mask": 1,
    }
    assert q.repaired["bbox_from_mask"] == 1 and q.repaired["mask_from_box"] == 1
    assert q.repaired["annotation_id_assigned"] == 2
    assert q.repaired["area_from_mask"] == 2
    assert sorted(data.coco.anns) == [1, 2, 3]
    assert len(data.target(1)["boxes"]) == 2 and len(data.target(2)["boxes"]) == 1
    from_mask = data.coco.anns[1]["bbox"]
    assert from_mask == pytest.approx([10, 10, 20, 10], abs=1)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "the top level is a JSON list"),
        (json.dumps({"annotations": [], "categories": CATEGORIES}), "no 'images' list"),
        (json.dumps({"images": {}, "categories": CATEGORIES}), "'images' is a dict"),
        (
            json.dumps({"images": [{"file_name": "a.png"}], "categories": CATEGORIES}),
            "images[0] has no integer 'id'",
        ),
        (
            json.dumps(
                {"images": [{"id": 1, "file_name": "img1.png"}] * 2, "categories": CATEGORIES}
            ),
            "image id 1 appears twice",
        ),
        (json.dumps({"images": [{"id": 1}], "categories": CATEGORIES}), "no 'file_name'"),
        (json.dumps({"images": [], "annotations": []}), "no 'categories' list"),
        (
            json.dumps({"images": [], "categories": [{"id": "1", "name": "a"}]}),
            "categories[0] has no integer 'id'",
        ),
        (json.dumps({"images": [], "categories": []}), "'categories' is empty"),
        (json.dumps({"images": [], "categories": CATEGORIES}), "no usable images"),
    ],
)
def test_malformed_files_name_the_file_and_the_problem(
    tmp_path: Path, content: str, expected: str
) -> None:
    ann_file, image_dir = _coco(tmp_path, [])
    ann_file.write_text(content)
    with pytest.raises(DatasetError) as err:
        CocoInstances(ann_file, image_dir)
    assert str(ann_file) in str(err.value)
    assert expected in str(err.value)


def test_utf8_bom_and_missing_sizes_are_fine(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "img1.png"},
        {"id": 2, "file_name": "img2.png", "width": None, "height": "48"},
    ]
    ann_file, image_dir = _coco(tmp_path, [_ann(1)], images=images)
    ann_file.write_bytes(b"\xef\xbb\xbf" + ann_file.read_bytes())

    data = CocoInstances(ann_file, image_dir)

    assert data.coco.imgs[1]["width"] == W and data.coco.imgs[2]["height"] == H
    assert data.quality.repaired["image_size_from_file"] == 2


def test_missing_unreadable_and_mismatched_images_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = [
        {"id": 1, "file_name": "img1.png", "width": W, "height": H},
        {"id": 2, "file_name": "gone.png", "width": W, "height": H},
        {"id": 3, "file_name": "text.png", "width": W, "height": H},
        {"id": 4, "file_name": "rot.png", "width": H, "height": W},
        {"id": 5, "file_name": "train2017/img5.png", "width": W, "height": H},
    ]
    ann_file, image_dir = _coco(tmp_path, [_ann(1), _ann(2, image_id=2)], images=images[:1])
    (image_dir / "text.png").write_text("this is not a PNG")
    _write_image(image_dir / "rot.png")
    _write_image(image_dir / "img5.png")
    data_json = json.loads(ann_file.read_text())
    data_json["images"] = images
    ann_file.write_text(json.dumps(data_json))

    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        data = CocoInstances(ann_file, image_dir)

    assert data.image_ids == [1, 5]
    assert data.quality.skipped == {"image_missing": 1, "image_unreadable": 1, "size_mismatch": 1}
    assert data.quality.images_skipped == 3
    assert data.quality.dropped == {"unknown_image": 1}  # the annotation of the missing image
    assert data.quality.repaired["file_name_by_base_name"] == 1
    assert "swapped" in caplog.text and "EXIF" in caplog.text
    with pytest.raises(DatasetError, match="gone.png not found.*strict"):
        CocoInstances(ann_file, image_dir, strict=True)


def test_truncated_image_skipped_by_check_or_fatal_under_strict(tmp_path: Path) -> None:
    ann_file, image_dir = _coco(tmp_path, [_ann(1), _ann(2, image_id=2)])
    full = (image_dir / "img2.png").read_bytes()
    (image_dir / "img2.png").write_bytes(full[: len(full) * 2 // 3])

    data = CocoInstances(ann_file, image_dir)
    with pytest.raises(DatasetError, match="img2.png: cannot read image"):
        data.load_image(2)
    assert data.check_images() == 1
    assert data.image_ids == [1]
    assert data.quality.skipped == {"image_unreadable": 1}
    assert data.load_image(1).shape == (H, W, 3)

    with pytest.raises(DatasetError, match="img2.png.*strict"):
        CocoInstances(ann_file, image_dir, strict=True).check_images()


def test_category_ids_of_a_model_give_the_labels(tmp_path: Path) -> None:
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "eel"}]
    anns = [_ann(1, category_id=7), _ann(2, category_id=3), _ann(3, category_id=9)]
    files = _coco(tmp_path, anns, categories=cats)

    default = CocoInstances(*files)
    model_order = CocoInstances(*files, category_ids=[7, 3])

    assert default.cat_to_label == {3: 1, 7: 2, 9: 3}
    assert default.class_names == ["cat", "dog", "eel"]
    assert model_order.label_to_cat == {1: 7, 2: 3}
    assert model_order.class_names == ["dog", "cat"]
    np.testing.assert_array_equal(model_order.target(1)["labels"], [1, 2])
    assert model_order.quality.dropped == {"unknown_category": 1}
    assert read_categories(files[0]) == [(3, "cat"), (7, "dog"), (9, "eel")]


def test_quality_report_structure(tmp_path: Path) -> None:
    anns = [
        _ann(1),
        _ann(2, bbox=[1, 1, 0, 3]),
        _ann(3, bbox=[60, 40, 10, 10], segmentation=[_rect(60, 40, 64, 48)]),
    ]
    data = CocoInstances(*_coco(tmp_path, anns))

    report = data.quality.to_dict()

    assert report == {
        "source": str(tmp_path / "annotations.json"),
        "images": 2,
        "images_skipped": 0,
        "images_skipped_by_reason": {},
        "negatives": 1,
        "annotations": 2,
        "crowd": 0,
        "annotations_dropped": {"zero_size_box": 1},
        "annotations_repaired": {"box_clipped": 1},
        "examples": {"zero_size_box": [2], "box_clipped": [3]},
    }
    json.dumps(report)


def test_demo_set_loads_clean(demo_data: dict[str, Path]) -> None:
    split = demo_data["val"]
    raw = json.loads((split / "annotations.json").read_text())

    data = CocoInstances(split / "annotations.json", split / "images")

    assert data.quality.dropped == {} and data.quality.skipped == {}
    assert data.quality.annotations == len(raw["annotations"])
    assert len(data) == len(raw["images"])
    for image_id in data.image_ids[:3]:
        target = data.target(image_id)
        assert target["masks"].shape[1:] == data.load_image(image_id).shape[:2]


def test_read_images_counts_and_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_image(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = [tmp_path / "bad.jpg", tmp_path / "ok.png"]
    quality = DataQuality(source="calib")

    with caplog.at_level(logging.WARNING):
        kept, arrays = read_images(paths, quality=quality)

    assert kept == [tmp_path / "ok.png"] and len(arrays) == 1
    assert quality.images == 1 and quality.images_skipped == 1
    assert quality.examples["image_unreadable"] == [str(tmp_path / "bad.jpg")]
    assert "skipped 1 of 2 images" in caplog.text
    with pytest.raises(DatasetError, match="bad.jpg.*strict"):
        read_images(paths, strict=True)
    with pytest.raises(DatasetError, match="none of the 1 images"):
        read_images(paths[:1])


def test_usable_images_keeps_paths_not_pixels(tmp_path: Path) -> None:
    _write_image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    quality = DataQuality(source="train")
    kept = usable_images([tmp_path / "bad.png", tmp_path / "ok.png"], quality=quality)
    assert kept == [tmp_path / "ok.png"]
    assert quality.skipped == {"image_unreadable": 1} and quality.images == 1
    with pytest.raises(DatasetError, match="bad.png.*strict"):
        usable_images([tmp_path / "bad.png", tmp_path / "ok.png"], strict=True)


def test_pseudo_labelled_coco_keeps_confident_nonempty_detections(tmp_path: Path) -> None:
    """A model's own detections become a COCO set with the model's category ids (the val
    reference of a build whose teacher has no labelled set)."""
    ann_file, image_dir = _coco(tmp_path / "src", [_ann(1)])
    images = CocoInstances(ann_file, image_dir)
    mask = np.zeros((H, W), np.float32)
    mask[5:15, 8:30] = 0.9

    def predict(image: np.ndarray) -> Detections:
        assert image.shape == (H, W, 3)
        return Detections(
            boxes=np.array(
                [[8, 5, 30, 15], [0, 0, 10, 10], [1, 1, 9, 9], [2, 2, 5, 5]], np.float32
            ),
            scores=np.array([0.9, 0.3, 0.8, 0.95], np.float32),
            labels=np.array([2, 1, 1, 3], np.int64),  # label 3 is beyond the 2 categories
            masks=np.stack([mask, mask, np.zeros_like(mask), mask]),
        )

    out = tmp_path / "pseudo.json"
    counts = write_pseudo_labelled_coco(
        predict, images, [(10, "disk"), (30, "block")], out, threshold=0.5, limit=1
    )

    assert counts == {"images": 1, "annotations": 1}
    pseudo = CocoInstances(out, image_dir, category_ids=[10, 30])
    assert pseudo.image_ids == [1]
    (ann,) = pseudo.coco.loadAnns(pseudo.coco.getAnnIds())
    assert ann["category_id"] == 30 and ann["bbox"] == [8.0, 5.0, 22.0, 10.0]
    decoded = pseudo.coco.annToMask(ann)
    assert decoded.sum() == 10 * 22 and decoded[5:15, 8:30].all()
    assert pseudo.target(1)["labels"].tolist() == [2]
