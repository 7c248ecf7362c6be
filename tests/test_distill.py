"""The distill stage: parameter copying, loss plumbing, resume, unlabelled images, imitation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from pipeline import distill as distill_module
from pipeline.datasets import CocoInstances, list_images
from pipeline.distill import (
    DistillSettings,
    copy_matching_parameters,
    distill,
    feature_imitation_loss,
    merge_targets,
    object_mask,
    pseudo_labels,
)
from pipeline.errors import ConfigError, DatasetError
from pipeline.models import build_model, student_spec

DETECTION_TERMS = (
    "loss_objectness",
    "loss_rpn_box_reg",
    "loss_classifier",
    "loss_box_reg",
    "loss_mask",
)
# tiny budgets: 128 px student, 2 images a step
TINY = {"batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def teacher(demo_teacher):
    return demo_teacher.model


@pytest.fixture(scope="module")
def train_set(demo_data):
    return CocoInstances(demo_data["train"] / "annotations.json", demo_data["train"] / "images")


@pytest.fixture(scope="module")
def spec(teacher):
    return student_spec(
        num_classes=teacher.roi_heads.box_predictor.cls_score.out_features, image_size=128
    )


@pytest.fixture(scope="module")
def reference_run(teacher, spec, train_set, tmp_path_factory):
    """An uninterrupted 4-step run whose copied heads train from step 1 on."""
    settings = DistillSettings(steps=4, freeze_heads_steps=1, **TINY)
    workdir = tmp_path_factory.mktemp("distill_ref")
    student, report = distill(teacher, spec, train=train_set, settings=settings, workdir=workdir)
    return settings, student, report, workdir


def test_copy_matching_parameters_copies_whole_matching_modules(teacher, spec):
    torch.manual_seed(0)
    student = build_model(spec)
    copied = copy_matching_parameters(teacher, student)
    modules = {k.rsplit(".", 1)[0] for k in copied}

    assert {
        "rpn.head.conv.0.0",
        "rpn.head.cls_logits",
        "rpn.head.bbox_pred",
        "roi_heads.box_head.fc6",
        "roi_heads.box_head.fc7",
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
        "backbone.fpn.layer_blocks.0.0",
    } <= modules
    # MobileNet body, FPN lateral convs (40/112/960 inputs) and the narrower mask head differ
    assert not any(k.startswith("backbone.body.") for k in copied)
    assert not any(k.startswith("backbone.fpn.inner_blocks.") for k in copied)
    assert not any(
        k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor.")) for k in copied
    )
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for k in copied:
        assert torch.equal(student_state[k], teacher_state[k]), k


def test_distill_trains_from_teacher_and_reports(teacher, spec, train_set, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    settings = DistillSettings(steps=2, freeze_heads_steps=2, **TINY)

    student, report = distill(teacher, spec, train=train_set, settings=settings, workdir=tmp_path)

    assert not student.training and next(student.parameters()).device.type == "cpu"
    assert student.arch_spec == spec
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    # the teacher is only read
    assert all(torch.equal(before[k], teacher_state[k]) for k in before)
    assert not teacher.training
    # heads copied from the teacher and frozen for both steps stay the teacher's; the body trains
    assert student_state["roi_heads.box_predictor.cls_score.weight"].equal(
        teacher_state["roi_heads.box_predictor.cls_score.weight"]
    )
    assert student_state["rpn.head.cls_logits.weight"].equal(
        teacher_state["rpn.head.cls_logits.weight"]
    )
    torch.manual_seed(settings.seed)
    fresh = build_model(spec).state_dict()
    assert not student_state["backbone.body.0.0.weight"].equal(fresh["backbone.body.0.0.weight"])
    assert not student_state["roi_heads.mask_head.0.0.weight"].equal(
        fresh["roi_heads.mask_head.0.0.weight"]
    )

    assert report["steps"] == 2 and report["resumed_from_step"] == 0
    assert report["copied_from_teacher"]["parameters"] > 1_000_000
    assert "roi_heads.box_predictor.cls_score" in report["copied_from_teacher"]["modules"]
    losses = report["final_losses"]
    assert set(DETECTION_TERMS) | {"feature", "logit_kl", "loss"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["loss_classifier"] > 0 and losses["feature"] > 0 and losses["logit_kl"] >= 0
    assert report["student_macs"]["total"] < report["teacher_macs"]["total"]
    assert report["mac_ratio"] == pytest.approx(
        report["teacher_macs"]["total"] / report["student_macs"]["total"], abs=0.01
    )
    assert report["student_parameters"] < report["teacher_parameters"]
    assert report["device"] == "cpu"
    assert report["settings"]["steps"] == 2
    assert (tmp_path / "last.pt").is_file()


def test_interrupted_run_resumes_to_the_same_weights(
    teacher, spec, train_set, reference_run, tmp_path, monkeypatch
):
    settings, reference, reference_report, _ = reference_run
    real_step = distill_module._distill_step

    def interrupted(run, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(distill_module, "_distill_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, spec, train=train_set, settings=settings, workdir=tmp_path)
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == 2
    monkeypatch.setattr(distill_module, "_distill_step", real_step)

    resumed, report = distill(teacher, spec, train=train_set, settings=settings, workdir=tmp_path)

    assert report["resumed_from_step"] == 2
    assert report["final_losses"] == reference_report["final_losses"]
    expected = reference.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_finished_run_is_returned_without_training(
    teacher, spec, train_set, reference_run, monkeypatch
):
    settings, reference, _, workdir = reference_run

    def fail(run, step):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(distill_module, "_distill_step", fail)
    student, report = distill(teacher, spec, train=train_set, settings=settings, workdir=workdir)

    assert report["resumed_from_step"] == settings.steps
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in student.state_dict().items())


def test_unlabelled_images_train_on_pseudo_labels(teacher, spec, demo_data, tmp_path):
    images = list_images(demo_data["train"] / "images")
    settings = DistillSettings(steps=2, pseudo_label_threshold=0.05, **TINY)

    student, report = distill(teacher, spec, train=images, settings=settings, workdir=tmp_path)

    assert report["labels"] == "teacher pseudo-labels"
    assert report["images"] == len(images)
    losses = report["final_losses"]
    assert all(math.isfinite(v) for v in losses.values())
    # the teacher found objects, and their pasted masks trained the student's mask head
    assert losses["pseudo_labels_per_image"] > 0
    assert losses["loss_mask"] > 0


def _imitation_loss(teacher, student, data: CocoInstances, global_weight: float) -> float:
    """The imitation loss on the whole set as one batch, the student's BatchNorm on batch
    statistics (no running-stat lag after a few steps); a copy runs, the caller's model is kept."""
    student = copy.deepcopy(student).train()
    images = [
        torch.from_numpy(data.load_image(i).copy()).permute(2, 0, 1).float() / 255
        for i in data.image_ids
    ]
    targets = [
        {k: torch.from_numpy(v.copy()) for k, v in data.target(i).items()} for i in data.image_ids
    ]
    with torch.no_grad():
        batch, targets = student.transform(images, targets)
        t, s = teacher.backbone(batch.tensors), student.backbone(batch.tensors)
        boxes = [x["boxes"] for x in targets]
        return float(feature_imitation_loss(s, t, boxes, batch.tensors.shape[-2:], global_weight))


def test_feature_imitation_reduces_feature_mse(teacher, spec, train_set, tmp_path):
    # imitation alone, the whole tiny set in every step
    settings = DistillSettings(
        steps=12,
        detection_weight=0.0,
        logit_weight=0.0,
        box_weight=0.0,
        mask_weight=0.0,
        lr=3e-3,
        batch_size=len(train_set),
        warmup_steps=1,
        checkpoint_every=12,
    )
    torch.manual_seed(settings.seed)
    initial = build_model(spec)
    copy_matching_parameters(teacher, initial)

    student, report = distill(teacher, spec, train=train_set, settings=settings, workdir=tmp_path)

    assert set(report["final_losses"]) == {"feature", "loss", "pseudo_labels_per_image"}
    before = _imitation_loss(teacher, initial, train_set, settings.feature_global_weight)
    after = _imitation_loss(teacher, student, train_set, settings.feature_global_weight)
    # a zero student scores 1 + global weight; the fresh student is about there
    assert 0.8 < before < 1.5
    assert after < 0.5 * before, (before, after)
    # the report's plain eval-mode MSE falls too, more slowly (BatchNorm running stats lag)
    mse = report["feature_mse"]
    assert mse["after"] < 0.8 * mse["before"], mse


def test_pseudo_labels_keep_confident_detections_with_masks():
    masks = torch.zeros(3, 1, 28, 28)
    masks[:2, :, 4:24, 4:24] = 0.9
    dets = [
        {
            "boxes": torch.tensor([[10.0, 10, 50, 40], [60, 60, 90, 100], [0, 0, 30, 30]]),
            "scores": torch.tensor([0.9, 0.3, 0.8]),
            "labels": torch.tensor([1, 2, 3]),
            "masks": masks,
        }
    ]

    out = pseudo_labels(dets, [(120, 100)], threshold=0.5)[0]

    # the 0.3 detection is below threshold, the third has an empty mask
    assert out["labels"].tolist() == [1]
    assert out["masks"].shape == (1, 120, 100) and out["masks"].dtype == torch.uint8
    assert out["masks"][0, 25, 30] == 1 and out["masks"][0, 80, 80] == 0
    assert out["masks"][0].sum() > 0.5 * 40 * 30


def test_merge_targets_union_and_gt_first():
    def target(boxes, labels):
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.zeros(len(labels), 64, 64, dtype=torch.uint8),
        }

    gt = [target([[0, 0, 20, 20]], [1]), target([], [])]
    pseudo = [target([[1, 1, 21, 21], [40, 40, 60, 60]], [1, 2]), target([[5, 5, 9, 9]], [3])]

    union = merge_targets(gt, pseudo, "union")
    gt_first = merge_targets(gt, pseudo, "gt_first")

    # the pseudo box overlapping ground truth is dropped, the new object is added
    assert union[0]["labels"].tolist() == [1, 2]
    assert union[0]["boxes"][1].tolist() == [40, 40, 60, 60]
    assert gt_first[0]["labels"].tolist() == [1]
    # an image without ground truth takes the pseudo-labels in both modes
    assert union[1]["labels"].tolist() == [3] and gt_first[1]["labels"].tolist() == [3]


def test_object_mask_and_feature_loss_weighting():
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.zeros(0, 4)]

    mask = object_mask(boxes, (4, 4), (64, 64))

    assert mask[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert mask[1].sum() == 0
    teacher = {k: torch.ones(2, 8, 4, 4) for k in ("0", "1", "2", "pool")}
    zeros = {k: torch.zeros(2, 8, 4, 4) for k in teacher}
    # a zero student: 1 inside objects, plus global_weight * 1 over the map
    assert float(feature_imitation_loss(zeros, teacher, boxes, (64, 64), 0.25)) == pytest.approx(
        1.25
    )
    assert float(feature_imitation_loss(teacher, teacher, boxes, (64, 64), 0.25)) == 0.0


def test_settings_and_inputs_are_checked(teacher, spec, tmp_path):
    with pytest.raises(ConfigError, match="label_merge"):
        DistillSettings(label_merge="both")
    with pytest.raises(ConfigError, match="all 0"):
        DistillSettings(
            detection_weight=0, feature_weight=0, logit_weight=0, box_weight=0, mask_weight=0
        )
    with pytest.raises(ConfigError, match="num_classes"):
        distill(
            teacher,
            spec.with_(num_classes=7),
            train=[Path("x.png")],
            settings=DistillSettings(steps=1),
            workdir=tmp_path,
        )
    with pytest.raises(DatasetError, match="empty"):
        distill(teacher, spec, train=[], settings=DistillSettings(steps=1), workdir=tmp_path)
