"""Calibration sets: deterministic selection, manifests, the minimum-count warning (B11), and the
graph inputs captured from the FP32 engine."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import calibration
import maskedge_runner.preprocess as preprocess
from calibration import (
    build_calibration_set,
    calibration_set_from_coco,
    calibration_set_from_folder,
    collect_graph_inputs,
)
from pipeline.errors import ConfigError, DatasetError


def _write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        path = sub / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_calibration_reexports_the_one_preprocessing() -> None:
    assert calibration.letterbox is preprocess.letterbox
    assert calibration.load_image is preprocess.load_image
    assert calibration.MEAN == preprocess.MEAN and calibration.STD == preprocess.STD


def test_folder_set_is_recursive_sorted_and_hashed(tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 6)
    (tmp_path / "notes.txt").write_text("not an image")
    cs = calibration_set_from_folder(tmp_path, image_size=64, count=None, min_images=1)
    assert [i.path for i in cs.images] == sorted(paths, key=lambda p: p.as_posix())
    m = cs.manifest
    assert m["source"] == "folder" and m["count"] == 6 and m["available"] == 6
    assert m["selection"].startswith("all")
    for entry, item in zip(m["images"], cs.images, strict=True):
        assert entry["sha256"] == hashlib.sha256(item.path.read_bytes()).hexdigest()
        assert not Path(entry["path"]).is_absolute()
        assert entry["image_id"] is None
    assert m["preprocessing"]["size"] == 64
    assert m["preprocessing"]["mean"] == list(preprocess.MEAN)
    assert m["preprocessing"]["std"] == list(preprocess.STD)
    assert len(m["set_sha256"]) == 64
    arrays = list(cs)
    assert len(arrays) == 6 and all(a.dtype == np.uint8 and a.shape[2] == 3 for a in arrays)


def test_b11_selection_is_deterministic_and_seeded(tmp_path: Path) -> None:
    """B11: calibration is deterministic; the seed of the sample is recorded."""
    _write_images(tmp_path, 12)
    a = calibration_set_from_folder(tmp_path, image_size=64, count=5, seed=3, min_images=1)
    b = calibration_set_from_folder(tmp_path, image_size=64, count=5, seed=3, min_images=1)
    assert a.manifest == b.manifest
    assert a.manifest["count"] == 5 and a.manifest["seed"] == 3
    assert "seeded sample of 5" in a.manifest["selection"]
    chosen = [i.path for i in a.images]
    assert chosen == sorted(chosen, key=lambda p: p.as_posix())
    others = {
        tuple(
            i.path
            for i in calibration_set_from_folder(
                tmp_path, image_size=64, count=5, seed=s, min_images=1
            ).images
        )
        for s in range(4, 10)
    }
    assert len(others | {tuple(chosen)}) > 1  # another seed picks other images


def test_b11_set_hash_follows_content_and_preprocessing(tmp_path: Path) -> None:
    """B11: the recorded set hash changes with any image's bytes and with the preprocessing."""
    paths = _write_images(tmp_path, 3)
    before = calibration_set_from_folder(tmp_path, image_size=64, min_images=1).set_sha256
    assert calibration_set_from_folder(tmp_path, image_size=128, min_images=1).set_sha256 != before
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(paths[1])
    assert calibration_set_from_folder(tmp_path, image_size=64, min_images=1).set_sha256 != before


@pytest.mark.parametrize("count", [1, 3])
def test_b11_few_images_warn_and_are_recorded(tmp_path: Path, caplog, count: int) -> None:
    """B11: calibration with 1 image and with a few: warned about, count recorded."""
    _write_images(tmp_path, count)
    with caplog.at_level(logging.WARNING, logger="calibration.sets"):
        cs = calibration_set_from_folder(tmp_path, image_size=64)
    m = cs.manifest
    assert m["count"] == count and m["min_images"] == calibration.MIN_IMAGES
    assert m["below_minimum"] is True
    assert any(f"only {count} calibration images" in w for w in m["warnings"])
    assert any("fewer than the 32 recommended" in r.getMessage() for r in caplog.records)


def test_b11_unrepresentative_folder_warns(tmp_path: Path, caplog) -> None:
    """B11: a folder of copies of one photo and of blank frames calibrates like far fewer images;
    the distinct and blank counts are recorded and warned about."""
    (first,) = _write_images(tmp_path / "photos", 1)
    for i in range(3):
        (tmp_path / "photos" / f"copy_{i}.png").write_bytes(first.read_bytes())
    for i, value in enumerate((0, 255)):
        Image.fromarray(np.full((40, 60, 3), value, np.uint8)).save(tmp_path / f"blank_{i}.png")
    with caplog.at_level(logging.WARNING, logger="calibration.sets"):
        cs = calibration_set_from_folder(tmp_path, image_size=64, min_images=6)
    m = cs.manifest
    assert m["count"] == 6 and m["distinct"] == 3 and m["blank"] == 2
    assert m["below_minimum"] is False
    copies, blank = m["warnings"]
    assert (
        copies
        == "3 of the 6 calibration images are byte-identical copies of others: 3 distinct images"
    )
    assert blank.startswith("2 of the 6 calibration images are blank (pixel std < 2, e.g. blank_0")
    assert "byte-identical copies" in caplog.text and "are blank" in caplog.text


def test_enough_images_do_not_warn(tmp_path: Path, caplog) -> None:
    _write_images(tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger="calibration.sets"):
        cs = calibration_set_from_folder(tmp_path, image_size=64, min_images=4)
    assert cs.manifest["below_minimum"] is False and cs.manifest["warnings"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unreadable_images_are_skipped_or_refused(tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cs = calibration_set_from_folder(tmp_path, image_size=64, min_images=1)
    assert cs.manifest["count"] == 3 and cs.manifest["skipped_unreadable"] == 1
    assert bad not in [i.path for i in cs.images]
    with pytest.raises(DatasetError, match="broken.png"):
        calibration_set_from_folder(tmp_path, image_size=64, min_images=1, strict=True)
    listed = build_calibration_set(paths, image_size=64, count=2, min_images=1)
    assert listed.manifest["source"] == "paths" and listed.manifest["count"] == 2


def test_bad_calibration_requests_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        calibration_set_from_folder(tmp_path / "nowhere", image_size=64)
    with pytest.raises(DatasetError, match="no images found"):
        calibration_set_from_folder(tmp_path, image_size=64)
    _write_images(tmp_path, 2)
    with pytest.raises(ConfigError, match="count=0"):
        calibration_set_from_folder(tmp_path, image_size=64, count=0)
    with pytest.raises(DatasetError, match="no calibration images"):
        build_calibration_set([], image_size=64)


def test_coco_set_records_image_ids(demo_data) -> None:
    split = demo_data["calib"]
    cs = calibration_set_from_coco(
        split / "annotations.json", split / "images", image_size=128, min_images=1
    )
    m = cs.manifest
    assert m["source"] == "coco" and m["count"] == 4
    assert [e["image_id"] for e in m["images"]] == [1, 2, 3, 4]


def test_graph_inputs_are_what_the_fp32_graphs_are_fed(
    tiny_student, tmp_path_factory, demo_data
) -> None:
    from tiny_bundle import tiny_bundle

    from maskedge_runner.engine import Engine

    folder = tiny_bundle(tiny_student, tmp_path_factory, demo_data).folder
    engine = Engine.from_dir(folder, precision="fp32", runtime_options={"intra_op_num_threads": 1})
    split = demo_data["calib"]
    cs = calibration_set_from_coco(
        split / "annotations.json", split / "images", image_size=128, min_images=1
    )
    inputs = collect_graph_inputs(engine, cs.images)
    assert engine.capture is None  # restored
    c = engine.spec["fpn"]["channels"]
    assert len(inputs["backbone"]) == len(cs)
    for sample in inputs["backbone"]:
        assert sample["image"].shape == (1, 3, 128, 128) and sample["image"].dtype == np.float32
        assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert inputs["box_head"], "the RPN proposes boxes on every demo image"
    for sample in inputs["box_head"]:
        n = sample["rois"].shape[0]
        assert sample["rois"].shape == (n, c, 7, 7) and n > 0
    for sample in inputs["mask_head"]:
        assert sample["rois"].shape[1:] == (c, 14, 14)
    # the captured backbone input is exactly the one preprocessing of the image
    first = cs.images[0]
    x, _ = calibration.letterbox(calibration.load_image(first.path), 128)
    np.testing.assert_array_equal(inputs["backbone"][0]["image"], x)
    # pooled features are real: the first box-head sample differs from image to image
    assert not np.allclose(inputs["box_head"][0]["rois"], inputs["box_head"][1]["rois"])
    summary = calibration.graph_inputs_summary(inputs)
    assert summary["backbone"]["samples"] == len(cs)
    assert summary["box_head"]["rows"] == sum(s["rois"].shape[0] for s in inputs["box_head"])


def test_b11_graph_inputs_are_deterministic(tiny_student, tmp_path_factory, demo_data) -> None:
    """B11: calibration is deterministic: the same set gives bit-identical graph inputs (the
    samples quantize_static is fed), in the same order, from a fresh engine."""
    from tiny_bundle import tiny_bundle

    from maskedge_runner.engine import Engine

    folder = tiny_bundle(tiny_student, tmp_path_factory, demo_data).folder
    split = demo_data["calib"]

    def collect() -> tuple[str, dict]:
        cs = calibration_set_from_coco(
            split / "annotations.json", split / "images", image_size=128, count=3, min_images=1
        )
        engine = Engine.from_dir(
            folder, precision="fp32", runtime_options={"intra_op_num_threads": 1}
        )
        return cs.manifest["set_sha256"], collect_graph_inputs(engine, cs.images)

    (hash_a, a), (hash_b, b) = collect(), collect()
    assert hash_a == hash_b
    assert {g: len(a[g]) for g in a} == {g: len(b[g]) for g in b}
    assert a["backbone"] and a["box_head"]
    for graph in a:
        for x, y in zip(a[graph], b[graph], strict=True):
            assert x.keys() == y.keys()
            for name in x:
                np.testing.assert_array_equal(x[name], y[name], err_msg=f"{graph}/{name}")
