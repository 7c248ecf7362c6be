"""End-to-end builds on a tiny budget: bundle layout, manifest, caching, gates, atomicity."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pipeline.build import BuildConfig, run_build
from pipeline.cache import sha256_file
from pipeline.errors import ConfigError, GateError

pytestmark = pytest.mark.slow


def _config(demo_data, artifacts: Path, teacher: Path, **changes) -> BuildConfig:
    base = dict(
        target="arm64",
        checkpoint=teacher,
        train_coco=demo_data["train"] / "annotations.json",
        train_images=demo_data["train"] / "images",
        calib_images=demo_data["calib"] / "images",
        calib_count=4,
        val_coco=demo_data["val"] / "annotations.json",
        val_images=demo_data["val"] / "images",
        distill_steps=2,
        latency_runs=3,
        latency_warmup=1,
        artifacts=artifacts,
    )
    base.update(changes)
    return BuildConfig(**base)


@pytest.fixture(scope="module")
def teacher(demo_teacher) -> Path:
    return demo_teacher.path


@pytest.fixture(scope="module")
def built(demo_data, teacher, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("artifacts")
    manifest = run_build(_config(demo_data, artifacts, teacher))
    return artifacts, manifest


def test_bundle_layout_and_manifest(built):
    artifacts, manifest = built
    bundle = artifacts / "arm64"
    on_disk = json.loads((bundle / "manifest.json").read_text())
    assert on_disk["status"] == manifest["status"] == "passed"
    for precision in ("int8", "fp32"):
        for graph in ("backbone", "box_head", "mask_head"):
            assert (bundle / "models" / precision / f"{graph}.onnx").is_file()
    assert (bundle / "maskedge_runner" / "engine.py").is_file()
    assert (bundle / "report.md").read_text().startswith("# maskedge build report")
    for rel, digest in on_disk["files"].items():
        assert sha256_file(bundle / rel) == digest, rel
    ap = on_disk["parity"]["ap"]
    for key in ("teacher", "student_fp32", "student_int8"):
        assert {"box_ap", "mask_ap", "mask_ap50"} <= set(ap[key])
    assert on_disk["latency"]["int8_over_fp32"]["end_to_end_p50"] > 0
    assert on_disk["student"]["mac_ratio_teacher_over_student"] >= 3.0
    assert on_disk["calibration"]["manifest"]["count"] == 4
    assert [c["name"] for c in on_disk["classes"]] == ["disk", "block", "wedge"]
    assert not list(artifacts.glob(".staging-*"))


def test_report_compares_distilled_student_with_ground_truth_baseline(built):
    artifacts, manifest = built
    comparison = manifest["distillation"]["comparison"]
    rows = {r["model"]: r for r in comparison["rows"]}
    assert list(rows) == ["teacher", "student, ground truth only", "student, distilled"]
    baseline = comparison["baseline"]
    # the baseline had the same budget and no teacher at all
    assert baseline["steps"] == manifest["distillation"]["steps"] == 2
    assert baseline["settings"]["label_merge"] == "gt_only"
    assert baseline["settings"]["init_from_teacher"] is False
    assert baseline["settings"]["feature_weight"] == baseline["settings"]["logit_weight"] == 0
    assert rows["student, ground truth only"]["parameters"] == rows["student, distilled"][
        "parameters"]
    ap = manifest["parity"]["ap"]
    assert rows["student, distilled"]["mask_ap"] == ap["student_fp32_torch"]["mask_ap"]
    assert rows["teacher"]["mask_ap"] == ap["teacher"]["mask_ap"]
    gap = rows["teacher"]["mask_ap"] - rows["student, ground truth only"]["mask_ap"]
    closed = comparison["gap_closed"]["mask_ap"]
    if gap > 1e-9:
        expected = (rows["student, distilled"]["mask_ap"]
                    - rows["student, ground truth only"]["mask_ap"]) / gap
        assert closed == pytest.approx(expected, abs=1e-3)
    else:
        assert closed is None
    report = (artifacts / "arm64" / "report.md").read_text()
    assert "## Distillation" in report and "student, ground truth only" in report


def test_unlabelled_training_images_build_without_a_baseline(demo_data, teacher, tmp_path):
    manifest = run_build(_config(demo_data, tmp_path, teacher, train_coco=None))
    comparison = manifest["distillation"]["comparison"]
    assert "unlabelled" in comparison["baseline"]["skipped"]
    assert [r["model"] for r in comparison["rows"]] == ["teacher", "student, distilled"]
    assert comparison["gap_closed"] is None
    assert "No ground-truth-only baseline" in (tmp_path / "arm64" / "report.md").read_text()


def test_tarball_holds_the_bundle(built):
    artifacts, _ = built
    with tarfile.open(artifacts / "arm64" / "maskedge-arm64.tar.gz") as tar:
        names = tar.getnames()
    assert "maskedge-arm64/manifest.json" in names
    assert "maskedge-arm64/models/int8/backbone.onnx" in names


def test_second_build_reuses_cached_stages(built, demo_data, teacher, caplog):
    artifacts, _ = built
    with caplog.at_level("INFO"):
        manifest = run_build(_config(demo_data, artifacts, teacher))
    for stage in ("distill", "baseline", "export", "quantize"):
        assert manifest["stages"][stage]["cached"] is True, stage
    assert "reused from cache" in caplog.text


def test_impossible_parity_budget_fails_and_marks_nothing_passed(built, demo_data, teacher):
    artifacts, _ = built
    with pytest.raises(GateError, match="mask_ap_drop"):
        run_build(_config(demo_data, artifacts, teacher, parity_budget=-1.0))
    failed = artifacts / "arm64-failed"
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["gate"]["passed"] is False
    assert not (failed / "maskedge-arm64.tar.gz").exists()
    assert "FAIL" in (failed / "report.md").read_text()
    # the last bundle that passed is still there, whole, with its tarball
    passed = json.loads((artifacts / "arm64" / "manifest.json").read_text())
    assert passed["status"] == "passed"
    assert (artifacts / "arm64" / "maskedge-arm64.tar.gz").is_file()
    assert oct((artifacts / "arm64").stat().st_mode & 0o777) == "0o755"


def test_interrupted_build_leaves_no_half_written_bundle(demo_data, teacher, tmp_path,
                                                        monkeypatch):
    import pipeline.build as build

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_stage_parity", boom)
    with pytest.raises(KeyboardInterrupt):
        run_build(_config(demo_data, tmp_path, teacher))
    assert not (tmp_path / "arm64").exists()
    assert not list(tmp_path.glob(".staging-*"))


def test_val_options_must_come_together(demo_data, tmp_path):
    with pytest.raises(ConfigError, match="--val-coco and --val-images"):
        _config(demo_data, tmp_path, Path("teacher.pt"), val_images=None)
