"""The build's gate on made-up parity figures: AP drops, lost detections (B09), mask collapse (B08).

The figures are built by hand so each check's verdict is known; the real figures come from
``tests/test_build.py``'s builds.
"""

from __future__ import annotations

import numpy as np
import pytest

from maskedge_runner.detections import Detections
from pipeline.build import _count_lost_images, _judge, _mask_sharpness
from targets import get_target


def _det(scores: list[float], mask_value: float = 0.95, size: int = 32) -> Detections:
    n = len(scores)
    masks = np.zeros((n, size, size), np.float32)
    masks[:, 8:24, 8:24] = mask_value
    boxes = np.tile(np.array([[8, 8, 24, 24]], np.float32), (n, 1))
    return Detections(boxes, np.array(scores, np.float32), np.ones(n, np.int64), masks)


def _parity(fp32: list[Detections], int8: list[Detections], mask_ap=(0.30, 0.298)) -> dict:
    return {
        "ap": {"student_fp32": {"mask_ap": mask_ap[0], "box_ap": 0.3},
               "student_int8": {"mask_ap": mask_ap[1], "box_ap": 0.299}},
        "detections_lost": _count_lost_images(fp32, int8, score=0.5),
        "mask_sharpness": {"fp32": _mask_sharpness(fp32), "int8": _mask_sharpness(int8)},
    }


LATENCY = {"int8": {"end_to_end_ms": {"p90": 50.0}}, "gated": False, "gating_note": "host"}


@pytest.fixture(scope="module")
def profile():
    return get_target("arm64").profile("rpi5")


def _verdicts(gate: dict) -> dict[str, bool | None]:
    return {c["check"]: c["passed"] for c in gate["checks"]}


def test_equal_results_pass_every_accuracy_check(profile):
    dets = [_det([0.9, 0.7]), _det([0.8]), _det([])]

    gate = _judge(_parity(dets, dets), LATENCY, profile)

    assert gate["passed"] and gate["reasons"] == []
    assert _verdicts(gate)["latency_p90_ms"] is None  # host figures are not gated


def test_b09_images_that_lose_every_detection_fail_the_gate(profile):
    fp32 = [_det([0.9]) for _ in range(10)] + [_det([0.3])]
    int8 = [_det([0.9]) for _ in range(9)] + [_det([0.2]), _det([])]  # image 9 lost

    lost = _count_lost_images(fp32, int8, score=0.5)
    gate = _judge(_parity(fp32, int8), LATENCY, profile)

    # image 10 had only a low-score FP32 detection: it is not counted either way
    assert lost["images_with_fp32_detections"] == 10
    assert lost["images_slipping_under_threshold"] == 0
    assert lost["images_losing_all_detections"] == 1 and lost["fraction_lost"] == 0.1
    assert not gate["passed"]
    assert _verdicts(gate)["images_losing_detections"] is False
    assert any(r.startswith("images_losing_detections = 0.1") for r in gate["reasons"])


def test_scores_slipping_just_under_the_threshold_are_counted_apart_not_gated(profile):
    # FP32 0.52 -> INT8 0.46: the image still has its detection, a little less sure of it
    fp32 = [_det([0.52]), _det([0.9]), _det([0.8])]
    int8 = [_det([0.46]), _det([0.9]), _det([0.35])]  # image 2: 0.35 < 0.5 * 0.8 is lost

    lost = _count_lost_images(fp32, int8, score=0.5)

    assert lost["images_slipping_under_threshold"] == 1
    assert lost["images_losing_all_detections"] == 1
    assert lost["fraction_lost"] == pytest.approx(1 / 3, abs=1e-4)


def test_b08_masks_collapsed_to_one_half_fail_the_gate_even_with_ap_in_budget(profile):
    fp32 = [_det([0.9, 0.8]) for _ in range(4)]
    int8 = [_det([0.9, 0.8], mask_value=0.52) for _ in range(4)]

    gate = _judge(_parity(fp32, int8), LATENCY, profile)

    assert _verdicts(gate)["mask_ap_drop"] is True
    assert _verdicts(gate)["mask_sharpness_ratio"] is False
    assert not gate["passed"]


def test_a_mask_ap_drop_over_the_budget_is_named_with_its_value(profile):
    dets = [_det([0.9])]

    gate = _judge(_parity(dets, dets, mask_ap=(0.30, 0.285)), LATENCY, profile)

    assert not gate["passed"]
    assert gate["reasons"][0].startswith("mask_ap_drop = 1.5 (limit 1.0)")
