"""Builds from teachers users bring: a torchvision ResNet-50 FPN Mask R-CNN checkpoint (issue 6).

The acceptance build (``slow``) runs the real ``invoke build`` in a subprocess on a
``maskrcnn_resnet50_fpn(weights=None, num_classes=5)`` state_dict saved by the test as a DDP
training checkpoint (``{"model": {"module.<key>": ...}, "epoch": 3}``), on a tiny budget, into a
temporary ``$MASKEDGE_ARTIFACTS``. The other tests check, on small inputs, how a build picks its
data for such a teacher: classes and category ids, the demo set's fallbacks (pseudo-labels), the
data-quality and calibration sections of the report, and ``--strict``.

Cases from ../shared/cases: B16 (``module.`` prefix), B17 (wrapped dict, class count read off the
weights), B11 (calibration count warning in the report), B25 (unlabelled folders).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from pipeline.build import BuildConfig, _data_lines, _resolve_data
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import DatasetError

REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "demo" / "teacher.pt"
# the demo's categories under the ids of a user's own COCO export, plus one the demo never shows
USER_CATEGORIES = {1: (3, "disk"), 2: (7, "block"), 3: (11, "wedge")}
EXTRA_CATEGORY = (20, "cone")


def _user_val_coco(demo_val: Path, out: Path) -> Path:
    """The demo val annotations renumbered to sparse category ids [3, 7, 11, 20]."""
    doc = json.loads((demo_val / "annotations.json").read_text())
    doc["categories"] = [
        {"id": USER_CATEGORIES[c["id"]][0], "name": USER_CATEGORIES[c["id"]][1]}
        for c in doc["categories"]
    ] + [{"id": EXTRA_CATEGORY[0], "name": EXTRA_CATEGORY[1]}]
    for ann in doc["annotations"]:
        ann["category_id"] = USER_CATEGORIES[ann["category_id"]][0]
    out.write_text(json.dumps(doc))
    return out


@pytest.fixture(scope="module")
def r50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision maskrcnn_resnet50_fpn, 5 classes, saved as a DDP training checkpoint."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("r50") / "model_3.pth"
    torch.save({"model": state, "epoch": 3}, path)
    return path


def _invoke_build(*args: str, artifacts: Path) -> tuple[int, str]:
    """``invoke build ARGS`` in a subprocess, as a user runs it; its exit status and output."""
    env = {**os.environ, "MASKEDGE_ARTIFACTS": str(artifacts), "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "invoke", "build", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return out.returncode, out.stdout + out.stderr


def _folder_with_a_truncated_jpeg(images: Path, folder: Path) -> Path:
    """The demo images plus ``truncated.jpg``: the first half of a real JPEG."""
    folder.mkdir()
    sources = sorted(images.glob("*.png"))
    for src in sources:
        (folder / src.name).write_bytes(src.read_bytes())
    Image.open(sources[0]).convert("RGB").save(folder / "whole.jpg.tmp", format="JPEG")
    data = (folder / "whole.jpg.tmp").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg.tmp").unlink()
    return folder


@pytest.mark.slow
def test_b16_b17_resnet50_checkpoint_builds_a_bundle(
    r50_checkpoint: Path, demo_data: dict[str, Path], tmp_path: Path
) -> None:
    """B16/B17 acceptance: the R50 checkpoint goes through ``invoke build`` to a bundle.

    Architecture and class count come off the weights, the ``module.`` prefix is stripped and
    logged, class names and category ids come from the val COCO file (the checkpoint has none),
    the student learns from teacher pseudo-labels on an unlabelled folder through a 1x1 adapter
    (the teacher's FPN is 256 wide, the student's 128), a truncated JPEG in that folder is
    skipped and counted (B25), and 2 calibration images are warned about in the report (B11).
    The budget is tiny (1 distillation step, 128 px, 1 val image, 2 latency runs): the teacher
    has random weights, so AP is 0 throughout and is not what this test checks.
    """
    artifacts = tmp_path / "artifacts"
    val_coco = _user_val_coco(demo_data["val"], tmp_path / "val.json")
    train = _folder_with_a_truncated_jpeg(demo_data["train"] / "images", tmp_path / "train")
    rc, log = _invoke_build(
        "--target=arm64",
        f"--checkpoint={r50_checkpoint}",
        f"--train-images={train}",
        f"--calib-images={demo_data['calib'] / 'images'}",
        "--calib-count=2",
        f"--val-coco={val_coco}",
        f"--val-images={demo_data['val'] / 'images'}",
        "--val-limit=1",
        "--distill-steps=1",
        "--image-size=128",
        "--latency-runs=2",
        artifacts=artifacts,
    )
    assert rc == 0, log[-4000:]
    assert "Traceback" not in log
    assert "stripping the 'module.' prefix from every key" in log
    assert "skipped 1 of 9 images that could not be read" in log

    bundle = artifacts / "arm64"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert manifest["input"]["size"] == 128
    teacher = manifest["teacher"]
    assert teacher["arch"] == "maskrcnn_resnet50_fpn"
    loaded_as = teacher["loaded_as"]
    assert loaded_as["stripped_prefixes"] == ["module."]
    assert loaded_as["weights_key"] == "model"
    assert loaded_as["class_names_from"] == str(val_coco)
    layout = loaded_as["layout"]
    assert layout["num_classes"] == 5
    assert layout["backbone"] == "resnet50"
    assert layout["fpn_channels"] == 256
    assert layout["returned_layers"] == [1, 2, 3, 4]
    assert manifest["classes"] == [
        {"label": 1, "name": "disk", "category_id": 3},
        {"label": 2, "name": "block", "category_id": 7},
        {"label": 3, "name": "wedge", "category_id": 11},
        {"label": 4, "name": "cone", "category_id": 20},
    ]
    assert manifest["student"]["arch"]["num_classes"] == 5
    distilled = manifest["distillation"]
    assert distilled["labels"] == "teacher pseudo-labels"
    assert distilled["feature_adapter"] is True
    assert distilled["steps"] == 1
    assert manifest["parity"]["val_images"] == 1
    train_quality = manifest["data"]["quality"]["train"]
    assert train_quality["images"] == 8
    assert train_quality["images_skipped_by_reason"] == {"image_unreadable": 1}
    calibration = manifest["calibration"]["manifest"]
    assert calibration["count"] == 2 and calibration["below_minimum"] is True
    for precision in ("int8", "fp32"):
        for graph in ("backbone", "box_head", "mask_head"):
            assert (bundle / "models" / precision / f"{graph}.onnx").is_file()
    assert (bundle / "maskedge-arm64.tar.gz").is_file()

    report = (bundle / "report.md").read_text()
    assert "## Data" in report and "## Calibration" in report
    assert f"**validation** ({val_coco}): 6 images" in report
    assert f"unlabelled images {train} (8)" in report
    assert f"**train** ({train}): 8 images." in report
    assert f"- skipped 1 images: image_unreadable 1 (e.g. ['{train / 'truncated.jpg'}'])" in report
    assert "**warning**: only 2 calibration images (< 32)" in report
    assert f"set SHA-256 `{calibration['set_sha256']}`" in report

    # the bundle runs on its own and names the user's classes
    image = sorted((demo_data["val"] / "images").glob("*.png"))[0]
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskedge_runner",
            ".",
            f"--image={image}",
            "--score=0",
            f"--out={tmp_path / 'overlays'}",
        ],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    names = {line.split()[0] for line in ran.stdout.splitlines()[1:]}
    assert names <= {"disk", "block", "wedge", "cone"}
    assert (tmp_path / "overlays" / f"{image.stem}.overlay.png").is_file()


@pytest.mark.parametrize("folder", ["train", "calib", "val"])
def test_strict_build_stops_at_a_truncated_image_naming_it(
    demo_data: dict[str, Path], tmp_path: Path, folder: str
) -> None:
    """``invoke build --strict``: a truncated image in the training folder, the calibration
    folder or the val COCO set's folder stops the build before any stage runs, with one line
    naming the file and no traceback (exit status 1)."""
    images = {k: demo_data[k] / "images" for k in ("train", "calib", "val")}
    if folder == "val":  # cut one of the files the val COCO file names
        images["val"] = tmp_path / "val"
        shutil.copytree(demo_data["val"] / "images", images["val"])
        bad = sorted(images["val"].glob("*.png"))[2]
        bad.write_bytes(bad.read_bytes()[:-200])
    else:
        images[folder] = _folder_with_a_truncated_jpeg(images[folder], tmp_path / folder)
        bad = images[folder] / "truncated.jpg"
    rc, log = _invoke_build(
        "--target=arm64",
        f"--train-images={images['train']}",
        f"--calib-images={images['calib']}",
        f"--val-coco={demo_data['val'] / 'annotations.json'}",
        f"--val-images={images['val']}",
        "--strict",
        artifacts=tmp_path / "artifacts",
    )
    assert rc == 1, log[-4000:]
    assert "Traceback" not in log
    assert "[distill] started" not in log
    (line,) = [x for x in log.splitlines() if x.startswith("maskedge:")]
    assert str(bad) in line
    assert line.endswith("(strict: stopping; without strict it is skipped)")
    assert not (tmp_path / "artifacts" / "arm64").exists()


# -- how a build picks its data for a teacher that is not the demo's -------------------------------


def _resnet18_teacher(tmp_path: Path, num_classes: int = 4) -> Path:
    """A random torchvision ResNet-18 FPN Mask R-CNN (a small stand-in for users' teachers)."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=num_classes)
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


def _small_demo(tmp_path: Path, **changes: Any) -> BuildConfig:
    spec = {"train_images": 3, "calib_images": 1, "val_images": 2}
    return BuildConfig(artifacts=tmp_path / "artifacts", demo_spec=spec, **changes)


def test_demo_data_is_labelled_only_for_a_teacher_of_its_classes(
    demo_teacher: Any, tmp_path: Path
) -> None:
    data = _resolve_data(_small_demo(tmp_path), demo_teacher, "demo")
    assert [n for n in data.train.class_names] == ["disk", "block", "wedge"]
    assert data.sources["train"].startswith("demo train split")
    assert data.sources["validation"].startswith("demo val split")


def test_other_teachers_distill_on_demo_images_with_pseudo_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A teacher whose classes are not the demo's (the trained demo weights, named red, green,
    blue): the demo's labels (disk, block, wedge) are not its ground truth, so it distills on the
    demo images unlabelled and its own confident detections label the demo val images."""
    loaded = load_checkpoint(DEMO_TEACHER, class_names="red,green,blue")
    config = _small_demo(tmp_path)
    with caplog.at_level("WARNING", logger="pipeline.build"):
        data = _resolve_data(config, loaded, "teacher-hash")

    assert isinstance(data.train, list) and len(data.train) == 3
    assert all(p.suffix == ".png" for p in data.train)
    assert "teacher pseudo-labels only" in data.sources["train"]
    assert "agreement with the teacher, not accuracy" in data.sources["validation"]
    assert data.val.category_ids == [1, 2, 3]
    assert data.val.class_names == ["red", "green", "blue"]
    assert len(data.val) == 2 and data.val.coco.getAnnIds()
    assert "distilling on the 3 demo train images with teacher pseudo-labels only" in caplog.text
    assert "give --val-coco and --val-images for real figures" in caplog.text

    again = _resolve_data(config, loaded, "teacher-hash")  # the pseudo-labels are cached
    assert again.val.annotation_file == data.val.annotation_file
    assert again.val_hash == data.val_hash


def test_a_teacher_that_detects_nothing_on_the_demo_needs_a_val_set(tmp_path: Path) -> None:
    """A random-weight torchvision teacher (class_1..class_3) finds nothing scoring >= 0.5 on the
    demo val images: no pseudo-label reference, so the build asks for --val-coco/--val-images."""
    loaded = load_checkpoint(_resnet18_teacher(tmp_path), min_size=64, max_size=64)
    with pytest.raises(DatasetError) as err:
        _resolve_data(_small_demo(tmp_path), loaded, "teacher-hash")
    assert str(err.value) == (
        f"the teacher ({loaded.path}) detects nothing scoring >= 0.5 on the 2 demo val images, "
        "so there is no reference to validate against; give --val-coco and --val-images with "
        "annotated images of the teacher's classes"
    )


def _renumbered(src: Path, out: Path, ids: dict[int, int]) -> Path:
    doc = json.loads(src.read_text())
    for c in doc["categories"]:
        c["id"] = ids[c["id"]]
    for ann in doc["annotations"]:
        ann["category_id"] = ids[ann["category_id"]]
    out.write_text(json.dumps(doc))
    return out


def _config_with(demo_data: dict[str, Path], tmp_path: Path, **files: Path) -> BuildConfig:
    paths = dict(
        train_images=demo_data["train"] / "images",
        calib_images=demo_data["calib"] / "images",
        val_coco=demo_data["val"] / "annotations.json",
        val_images=demo_data["val"] / "images",
    )
    return BuildConfig(artifacts=tmp_path, **{**paths, **files})


def test_train_coco_without_any_teacher_category_says_what_to_give(
    tmp_path: Path, demo_data: dict[str, Path]
) -> None:
    loaded = load_checkpoint(
        _resnet18_teacher(tmp_path), class_names="a,b,c", min_size=64, max_size=64
    )
    coco = _renumbered(
        demo_data["train"] / "annotations.json", tmp_path / "train.json", {1: 30, 2: 70, 3: 110}
    )
    with pytest.raises(DatasetError) as err:
        _resolve_data(_config_with(demo_data, tmp_path, train_coco=coco), loaded, "h")
    message = str(err.value)
    assert message.startswith(f"{coco}: none of its category ids [30, 70, 110]")
    assert "the teacher's [1, 2, 3] (a, b, c), so it has no train ground truth" in message
    assert f"--class-names={coco}" in message and "--train-images" in message


@pytest.mark.parametrize("role", ["train", "val"])
def test_coco_whose_ids_name_other_classes_is_refused(
    tmp_path: Path, demo_data: dict[str, Path], role: str
) -> None:
    """Category 3 is "disk" in the user's file but "c" for a teacher named a, b, c: matching by
    id alone would train on (or score against) the wrong classes."""
    loaded = load_checkpoint(
        _resnet18_teacher(tmp_path), class_names="a,b,c", min_size=64, max_size=64
    )
    coco = _user_val_coco(demo_data[role if role == "train" else "val"], tmp_path / "user.json")
    with pytest.raises(DatasetError) as err:
        _resolve_data(_config_with(demo_data, tmp_path, **{f"{role}_coco": coco}), loaded, "h")
    assert str(err.value).startswith(
        f"{coco}: category ids name other classes than the teacher's (3: 'disk' here, 'c' for "
        f"the teacher), so its {role} labels would stand for the wrong classes; give the "
        f"annotations of the teacher's classes, or pass --class-names={coco}"
    )


def test_coco_ids_are_enough_when_the_teacher_names_no_classes(
    tmp_path: Path, demo_data: dict[str, Path]
) -> None:
    """A teacher without class names (class_1..class_3) takes a COCO file's categories by id;
    ids the teacher does not have are dropped and counted, not refused."""
    loaded = load_checkpoint(_resnet18_teacher(tmp_path), min_size=64, max_size=64)
    coco = _renumbered(
        demo_data["train"] / "annotations.json", tmp_path / "train.json", {1: 1, 2: 2, 3: 40}
    )
    data = _resolve_data(_config_with(demo_data, tmp_path, train_coco=coco), loaded, "h")
    assert data.train.category_ids == [1, 2, 3]
    assert data.quality["train"]["annotations_dropped"]["unknown_category"] > 0


def _folder_with_a_broken_image(tmp_path: Path, demo_data: dict[str, Path]) -> Path:
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, src in enumerate(sorted((demo_data["train"] / "images").glob("*.png"))[:2]):
        Image.open(src).save(folder / f"{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return folder


def test_strict_fails_on_an_unreadable_training_image_else_counts_it(
    tmp_path: Path, demo_data: dict[str, Path], demo_teacher: Any
) -> None:
    """B25 unlabelled folder with a damaged file: skipped and counted (report), or, --strict,
    the build stops naming the file."""
    folder = _folder_with_a_broken_image(tmp_path, demo_data)
    common = dict(
        artifacts=tmp_path,
        train_images=folder,
        calib_images=demo_data["calib"] / "images",
        val_coco=demo_data["val"] / "annotations.json",
        val_images=demo_data["val"] / "images",
    )
    data = _resolve_data(BuildConfig(**common), demo_teacher, "h")
    assert [p.name for p in data.train] == ["0.jpg", "1.jpg"]
    quality = data.quality["train"]
    assert quality["images"] == 2
    assert quality["images_skipped_by_reason"] == {"image_unreadable": 1}
    assert quality["examples"]["image_unreadable"] == [str(folder / "broken.jpg")]

    with pytest.raises(DatasetError) as err:
        _resolve_data(BuildConfig(**common, strict=True), demo_teacher, "h")
    assert str(folder / "broken.jpg") in str(err.value)
    assert "strict" in str(err.value)


def test_a_calibration_folder_of_only_broken_files_stops_before_distillation(
    tmp_path: Path, demo_data: dict[str, Path], demo_teacher: Any
) -> None:
    """Caught when the data is resolved (seconds), not at the calibrate stage after the
    distillation (half an hour on the default budget)."""
    broken = tmp_path / "calib"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    config = BuildConfig(artifacts=tmp_path, calib_images=broken,
                         val_coco=demo_data["val"] / "annotations.json",
                         val_images=demo_data["val"] / "images")
    with pytest.raises(DatasetError) as err:
        _resolve_data(config, demo_teacher, "h")
    assert str(err.value).startswith(f"{broken}: none of the 1 candidate calibration images")
    assert "--calib-images" in str(err.value)


def test_report_shows_data_quality_and_the_calibration_warning() -> None:
    """B11: the calibration count, seed, set hash and the below-minimum warning reach report.md,
    next to what each data set lost and why."""
    manifest = {
        "data": {
            "sources": {
                "train": "unlabelled images /d/train (7)",
                "validation": "COCO /d/val.json",
            },
            "quality": {
                "validation": {
                    "source": "/d/val.json",
                    "images": 5,
                    "images_skipped": 1,
                    "images_skipped_by_reason": {"image_unreadable": 1},
                    "negatives": 2,
                    "annotations": 9,
                    "crowd": 1,
                    "annotations_dropped": {"zero_size_box": 2, "bad_polygon": 1},
                    "annotations_repaired": {"box_clipped": 1},
                    "examples": {"zero_size_box": [4, 8], "bad_polygon": [5], "box_clipped": [6]},
                },
                "train": {
                    "source": "/d/train",
                    "images": 7,
                    "images_skipped_by_reason": {},
                    "annotations": 0,
                    "annotations_dropped": {},
                    "annotations_repaired": {},
                    "examples": {},
                },
            },
        },
        "calibration": {
            "manifest": {
                "count": 3,
                "available": 3,
                "selection": "all, sorted by path",
                "seed": 0,
                "root": "/d/calib",
                "set_sha256": "ab" * 32,
                "skipped_unreadable": 0,
                "warnings": [
                    "only 3 calibration images (< 32); INT8 ranges may not represent "
                    "deployment images"
                ],
            }
        },
    }
    text = "\n".join(_data_lines(manifest))
    assert "- validation: COCO /d/val.json" in text
    assert (
        "**validation** (/d/val.json): 5 images, 9 annotations, 2 without objects (kept as "
        "negatives), 1 crowd regions (ignored regions in evaluation)." in text
    )
    assert "- skipped 1 images: image_unreadable 1" in text
    assert (
        "- dropped 3 annotations: bad_polygon 1 (e.g. [5]), zero_size_box 2 (e.g. [4, 8])" in text
    )
    assert "- repaired 1 annotations: box_clipped 1 (e.g. [6])" in text
    assert "**train** (/d/train): 7 images.\n- nothing skipped, dropped or repaired" in text
    assert "3 images of 3 available (all, sorted by path; seed 0) from /d/calib" in text
    assert f"set SHA-256 `{'ab' * 32}`" in text
    assert "- **warning**: only 3 calibration images (< 32)" in text
