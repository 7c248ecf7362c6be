"""The distillation terms one by one: level matching, channel-wise KL, RoI logit/box and mask KD.

Small tensors and tiny randomly initialised models; each test states the value a term must take.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill import (
    channel_wise_loss,
    mask_distill_loss,
    match_levels,
    roi_distill_losses,
)
from pipeline.errors import ConfigError
from pipeline.models import build_model, count_parameters, student_spec


def _levels(sizes: dict[str, int], channels: int = 4, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, channels, s, s, generator=gen) for k, s in sizes.items()}


def test_levels_pair_by_stride_with_a_teacher_that_has_a_stride_4_level():
    # torchvision's ResNet-50 FPN: "0" is stride 4, so the student's "0" (stride 8) is its "1"
    student = _levels({"0": 32, "1": 16, "2": 8, "pool": 4})
    teacher = _levels({"0": 64, "1": 32, "2": 16, "3": 8, "pool": 4})

    assert match_levels(student, teacher) == [("0", "1"), ("1", "2"), ("2", "3"),
                                              ("pool", "pool")]
    same = _levels({"0": 32, "1": 16, "2": 8, "pool": 4})
    assert match_levels(student, same) == [(k, k) for k in student]
    with pytest.raises(ConfigError, match="share no stride"):
        match_levels(student, _levels({"a": 7, "b": 5}))


def test_channel_wise_loss_is_zero_for_the_same_maps_and_shift_invariant_per_channel():
    teacher = _levels({"0": 8, "1": 4})
    shift = torch.randn(1, 4, 1, 1)  # a constant per channel: same spatial distribution
    shifted = {k: v + shift for k, v in teacher.items()}

    assert float(channel_wise_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(channel_wise_loss(shifted, teacher, 2.0)) == pytest.approx(0.0, abs=1e-5)
    other = _levels({"0": 8, "1": 4}, seed=1)
    assert float(channel_wise_loss(other, teacher, 2.0)) > 0.01


def test_channel_wise_loss_value_matches_the_definition():
    # one level, one image, one channel of 4 locations: T^2 * KL(softmax(t/T) || softmax(s/T))
    s = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 2, 2)
    t = torch.tensor([3.0, 2.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    temperature = 2.0
    p = F.softmax(t.flatten() / temperature, dim=0)
    q = F.softmax(s.flatten() / temperature, dim=0)
    expected = temperature**2 * float((p * (p.log() - q.log())).sum())

    got = float(channel_wise_loss({"0": s}, {"0": t}, temperature))

    assert got == pytest.approx(expected, rel=1e-5)


def test_channel_wise_loss_goes_through_the_adapter_and_trains_it():
    student = _levels({"0": 8}, channels=3)
    teacher = _levels({"0": 8}, channels=5, seed=2)
    adapter = torch.nn.Conv2d(3, 5, 1)

    loss = channel_wise_loss(student, teacher, 4.0, adapter)
    loss.backward()

    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    teacher = build_model(student_spec(num_classes=4, image_size=128, fpn_channels=32)).eval()
    student = copy.deepcopy(teacher)
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        feats = teacher.backbone(images)
    proposals = [
        torch.tensor([[4.0, 4.0, 60.0, 60.0], [30.0, 20.0, 120.0, 90.0], [0.0, 64.0, 40.0, 127.0]]),
        torch.tensor([[10.0, 10.0, 100.0, 100.0]]),
    ]
    return teacher, student, feats, proposals, [(128, 128), (128, 128)]


def test_roi_terms_vanish_for_a_student_equal_to_the_teacher(tiny_pair):
    teacher, student, feats, proposals, sizes = tiny_pair

    losses = roi_distill_losses(teacher, student, feats, feats, proposals, sizes, 2.0)

    assert losses["logit_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["box_kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_roi_terms_train_the_student_and_never_the_teacher(tiny_pair):
    teacher, student, feats, proposals, sizes = tiny_pair
    moved = copy.deepcopy(student)
    with torch.no_grad():
        for p in moved.roi_heads.box_predictor.parameters():
            p.add_(0.5 * torch.randn_like(p))

    losses = roi_distill_losses(teacher, moved, feats, feats, proposals, sizes, 2.0)
    (losses["logit_kl"] + losses["box_kd"]).backward()

    assert losses["logit_kl"].item() > 1e-3 and losses["box_kd"].item() > 1e-3
    assert moved.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert moved.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_roi_terms_are_zero_and_differentiable_without_proposals(tiny_pair):
    teacher, student, feats, _, sizes = tiny_pair
    none = [torch.zeros(0, 4), torch.zeros(0, 4)]

    losses = roi_distill_losses(teacher, student, feats, feats, none, sizes, 2.0)

    assert losses["logit_kl"].item() == 0.0 and losses["logit_kl"].requires_grad


def test_mask_term_is_the_score_weighted_bce_toward_the_teacher_probabilities(tiny_pair):
    _, student, feats, _, sizes = tiny_pair
    m = 28  # the teacher's own mask resolution
    gen = torch.Generator().manual_seed(3)
    detections = [
        {
            "boxes": torch.tensor([[8.0, 8.0, 64.0, 64.0], [20.0, 30.0, 90.0, 110.0],
                                   [0.0, 0.0, 10.0, 10.0]]),
            "labels": torch.tensor([1, 3, 2]),
            "scores": torch.tensor([0.9, 0.3, 0.01]),  # the last is under min_score
            "masks": torch.rand(3, 1, m, m, generator=gen),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "scores": torch.zeros(0), "masks": torch.zeros(0, 1, m, m)},
    ]

    got = mask_distill_loss(student, feats, detections, sizes, min_score=0.05)

    heads = student.roi_heads
    pooled = heads.mask_roi_pool(feats, [detections[0]["boxes"][:2], torch.zeros(0, 4)], sizes)
    logits = heads.mask_predictor(heads.mask_head(pooled))[torch.arange(2), torch.tensor([1, 3])]
    target = detections[0]["masks"][:2, 0]
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target[:, None], size=logits.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0]
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2))
    expected = float((per * torch.tensor([0.9, 0.3])).sum() / 1.2)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    got.backward()
    assert heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_mask_term_without_teacher_detections_is_zero(tiny_pair):
    _, student, feats, _, sizes = tiny_pair
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 28, 28)}

    assert float(mask_distill_loss(student, feats, [empty, empty], sizes)) == 0.0


def test_resnet18_student_builds_runs_and_is_larger_than_the_mobilenet_one():
    mobilenet = build_model(student_spec(num_classes=4, image_size=128))
    resnet = build_model(student_spec(num_classes=4, backbone="resnet18", image_size=128)).eval()

    with torch.no_grad():
        out = resnet(torch.rand(1, 3, 128, 128))

    assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}
    assert count_parameters(resnet) > count_parameters(mobilenet)
