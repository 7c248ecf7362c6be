"""maskedge_runner: FP32 graphs + numpy host code reproduce the PyTorch model; the runner's
host code against torchvision's ops; backends, bundle loading, the CLI and its imports."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import maskrcnn_inference, paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign, batched_nms, nms, roi_align
from torchvision.ops.poolers import initLevelMapper

from maskedge_runner import postprocess as pp
from maskedge_runner.__main__ import main as runner_main
from maskedge_runner.backends import BACKENDS, GraphFn, RunnerError, make_backend
from maskedge_runner.detections import Detections
from maskedge_runner.engine import STAGES, Engine
from maskedge_runner.preprocess import letterbox
from pipeline.datasets import CocoInstances
from pipeline.evaluate import TorchPredictor
from pipeline.export import BackboneGraph, BoxHeadGraph, MaskHeadGraph, export_graphs

REPO = Path(__file__).resolve().parent.parent
# model-frame tolerances of FP32 ONNX Runtime graphs + host code against PyTorch
BOX_ATOL = 1e-3  # pixels at the model input size
SCORE_ATOL = 1e-5
MASK_ATOL = 1e-4  # mask probabilities (28x28 and pasted)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def teacher_bundle(demo_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher_bundle")
    export_graphs(demo_teacher.model, out)
    return out


@pytest.fixture(scope="module")
def student_bundle(tiny_student, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student_bundle")
    export_graphs(tiny_student, out)
    return out


@pytest.fixture(scope="module")
def teacher_engine(teacher_bundle) -> Engine:
    return Engine.from_dir(teacher_bundle, precision="fp32")


@pytest.fixture(scope="module")
def val_images(demo_data) -> list[np.ndarray]:
    data = CocoInstances(demo_data["val"] / "annotations.json", demo_data["val"] / "images")
    return [data.load_image(i) for i in data.image_ids]


@pytest.fixture(params=["teacher", "student"])
def model_and_engine(request):
    if request.param == "teacher":
        return request.getfixturevalue("demo_teacher").model, request.getfixturevalue(
            "teacher_engine"
        )
    bundle = request.getfixturevalue("student_bundle")
    return request.getfixturevalue("tiny_student"), Engine.from_dir(bundle, precision="fp32")


def _blank(h: int = 256, w: int = 256, value: int = 0) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def _resized(image: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def _pairing(
    ref_boxes: np.ndarray,
    ref_scores: np.ndarray,
    ref_labels: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    box_atol: float,
) -> np.ndarray:
    """Index of each reference detection among ``boxes``: same label, box within ``box_atol``.

    The order may differ only between detections whose scores are within float32 rounding of
    each other (random-weight models produce such near-ties); anything else fails.
    """
    assert len(scores) == len(ref_scores), (len(scores), len(ref_scores))
    order = np.full(len(ref_scores), -1)
    free = np.ones(len(scores), bool)
    for i in range(len(ref_scores)):
        diff = np.abs(boxes - ref_boxes[i]).max(axis=1) if len(boxes) else np.zeros(0)
        candidates = np.flatnonzero(free & (labels == ref_labels[i]) & (diff <= box_atol))
        assert candidates.size, f"reference detection {i} has no counterpart"
        j = candidates[np.argmin(diff[candidates])]
        assert abs(float(ref_scores[j]) - float(ref_scores[i])) <= 1e-6 or i == j, (i, j)
        order[i] = j
        free[j] = False
    return order


def _assert_same_frame(ref: dict, got: dict, box_atol: float = BOX_ATOL) -> dict[str, float]:
    """Model-frame results equal: the same detections, best first, values within tolerance."""
    assert got["boxes"].dtype == np.float32 and got["labels"].dtype == np.int64
    assert got["masks"].shape[1:] == (28, 28)
    assert got["scores"].shape == got["labels"].shape == got["boxes"].shape[:1]
    assert np.all(np.diff(got["scores"]) <= 0), "detections are not sorted by score"
    order = _pairing(
        ref["boxes"], ref["scores"], ref["labels"],
        got["boxes"], got["scores"], got["labels"], box_atol,
    )  # fmt: skip
    if not len(order):
        return {"boxes": 0.0, "scores": 0.0, "masks": 0.0}
    diffs = {k: float(np.abs(got[k][order] - ref[k]).max()) for k in ("boxes", "scores", "masks")}
    assert diffs["boxes"] <= box_atol
    assert diffs["scores"] <= SCORE_ATOL
    assert diffs["masks"] <= MASK_ATOL
    return diffs


def _assert_same_detections(ref: Detections, got: Detections, box_atol: float = BOX_ATOL) -> None:
    """Original-frame results (Detections) equal within tolerance."""
    assert got.masks.shape == ref.masks.shape
    # boxes are scaled back up by at most 1/scale (2x for the images used here)
    order = _pairing(
        ref.boxes, ref.scores, ref.labels, got.boxes, got.scores, got.labels, 2 * box_atol
    )
    if len(order):
        assert np.abs(got.scores[order] - ref.scores).max() <= SCORE_ATOL
        assert np.abs(got.masks[order] - ref.masks).max() <= MASK_ATOL
        # the binary masks COCO evaluation sees differ in at most a few boundary pixels
        assert np.sum((got.masks[order] > 0.5) != (ref.masks > 0.5)) <= 5


def _torch_graphs(model: torch.nn.Module) -> dict[str, GraphFn]:
    """The three graphs as PyTorch modules behind the GraphFn signature."""
    modules = {
        "backbone": BackboneGraph(model).eval(),
        "box_head": BoxHeadGraph(model).eval(),
        "mask_head": MaskHeadGraph(model).eval(),
    }
    names = {"box_head": ["class_logits", "box_deltas"], "mask_head": ["mask_logits"]}

    def graph_fn(name: str) -> GraphFn:
        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = modules[name](torch.from_numpy(next(iter(inputs.values()))))
            out = [out] if isinstance(out, torch.Tensor) else list(out)
            if name == "backbone":
                levels = ["0", "1", "2", "pool"]
                keys = [f"feat_{n}" for n in levels]
                keys += [f"rpn_logits_{i}" for i in range(4)] + [
                    f"rpn_deltas_{i}" for i in range(4)
                ]
            else:
                keys = names[name]
            return {k: v.numpy() for k, v in zip(keys, out, strict=True)}

        return run

    return {name: graph_fn(name) for name in modules}


# ---------------------------------------------------------------------------------------------
# parity with the PyTorch model


@pytest.fixture(scope="module")
def teacher_references(demo_teacher, val_images) -> list[dict]:
    """TorchPredictor.raw of the teacher on each val image (computed once: torch is the slow
    part of these tests)."""
    reference = TorchPredictor(demo_teacher.model)
    return [reference.raw(letterbox(image, reference.size)[0]) for image in val_images]


def test_fp32_parity_on_demo_val(model_and_engine, val_images, request):
    model, engine = model_and_engine
    reference = TorchPredictor(model)
    is_teacher = "teacher" in request.node.callspec.id
    cached = request.getfixturevalue("teacher_references") if is_teacher else None
    found = 0
    for i, image in enumerate(val_images):
        x, _ = letterbox(image, engine.size)
        got = engine.predict_letterboxed(x)
        _assert_same_frame(cached[i] if is_teacher else reference.raw(x), got)
        found += len(got["scores"])
        if i < 2:  # mapped back to the image (boxes scaled and clipped, masks pasted)
            _assert_same_detections(reference(image), engine.predict(image))
    assert found > 0, "no detections at all: the parity check compared nothing"


@pytest.mark.parametrize("shape", [(200, 320), (320, 200)])
def test_fp32_parity_on_non_square_images(demo_teacher, teacher_engine, val_images, shape):
    """B04: letterboxed to the model's square, boxes and masks mapped back, torch parity."""
    h, w = shape
    reference = TorchPredictor(demo_teacher.model)
    image = _resized(val_images[0], h, w)
    x, box = letterbox(image, teacher_engine.size)
    assert (box.new_h, box.new_w) == ((160, 256) if h < w else (256, 160))
    ref = reference.raw(x)
    got = teacher_engine.predict_letterboxed(x)
    _assert_same_frame(ref, got)
    assert len(got["scores"]) > 0
    det = teacher_engine.predict(image)
    _assert_same_detections(reference(image), det)
    assert det.masks.shape == (len(det), h, w)
    assert det.boxes[:, 0::2].min() >= 0 and det.boxes[:, 0::2].max() <= w
    assert det.boxes[:, 1::2].min() >= 0 and det.boxes[:, 1::2].max() <= h
    # mapped back: original = model / scale, clipped to the image
    expected = np.clip(got["boxes"] / box.scale, 0, [w, h, w, h])
    np.testing.assert_allclose(det.boxes, expected, atol=1e-4)


def test_fp32_parity_on_blank_image(demo_teacher, teacher_engine):
    reference = TorchPredictor(demo_teacher.model)
    image = _blank(200, 320, 128)
    x, _ = letterbox(image, teacher_engine.size)
    _assert_same_frame(reference.raw(x), teacher_engine.predict_letterboxed(x))
    _assert_same_detections(reference(image), teacher_engine.predict(image))


def test_host_code_alone_matches_torchvision(
    demo_teacher, teacher_bundle, val_images, teacher_references
):
    """With the graphs run by PyTorch itself, only the host code differs from torchvision."""
    spec = json.loads((teacher_bundle / "graph_spec.json").read_text())
    engine = Engine(spec, _torch_graphs(demo_teacher.model))
    for image, ref in list(zip(val_images, teacher_references, strict=True))[:2]:
        x, _ = letterbox(image, engine.size)
        diffs = _assert_same_frame(ref, engine.predict_letterboxed(x), box_atol=1e-4)
        assert diffs["scores"] <= 1e-6


def test_zero_detections_skip_the_mask_graph(demo_teacher, teacher_engine, val_images):
    spec = copy.deepcopy(teacher_engine.spec)
    spec["roi_heads"]["score_thresh"] = 1.0
    engine = Engine(spec, teacher_engine.graphs)
    seen: list[tuple[str, dict]] = []
    engine.capture = lambda name, inputs: seen.append((name, inputs))
    image = _resized(val_images[1], 200, 320)
    det = engine.predict(image)
    assert [name for name, _ in seen] == ["backbone", "box_head"]
    assert det.boxes.shape == (0, 4) and det.boxes.dtype == np.float32
    assert det.scores.shape == (0,) and det.labels.shape == (0,)
    assert det.labels.dtype == np.int64
    assert det.masks.shape == (0, 200, 320)
    assert engine.last_timings["mask_head"] == 0.0 and engine.last_timings["roi_align_mask"] == 0.0
    assert engine.last_timings["box_head"] > 0.0
    raw = engine.predict_letterboxed(letterbox(image, engine.size)[0])
    assert raw["masks"].shape == (0, 28, 28) and raw["boxes"].shape == (0, 4)
    # torchvision agrees that nothing scores above 1.0
    model = demo_teacher.model
    saved = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = 1.0
    try:
        assert len(TorchPredictor(model)(image)) == 0
    finally:
        model.roi_heads.score_thresh = saved


def test_b01_blank_then_normal_equals_fresh_session(teacher_bundle, val_images):
    fresh = Engine.from_dir(teacher_bundle, precision="fp32").predict(val_images[2])
    used = Engine.from_dir(teacher_bundle, precision="fp32")
    used.predict(_blank())
    used.predict(_blank(64, 300, 255))
    again = used.predict(val_images[2])
    assert len(fresh) > 0
    for field in ("boxes", "scores", "labels", "masks"):
        np.testing.assert_array_equal(getattr(again, field), getattr(fresh, field))


def test_b02_b03_several_images_give_one_result_each(teacher_engine, val_images):
    images = [val_images[0], _blank(), _resized(val_images[3], 240, 180), val_images[0]]
    results = teacher_engine.predict_many(images)
    assert len(results) == len(images)
    for image, det in zip(images, results, strict=True):
        single = teacher_engine.predict(image)
        assert det.masks.shape == (len(det), *image.shape[:2])
        assert det.boxes.shape == (len(det), 4)
        for field in ("boxes", "scores", "labels", "masks"):
            np.testing.assert_array_equal(getattr(det, field), getattr(single, field))
    np.testing.assert_array_equal(results[0].boxes, results[3].boxes)


def test_capture_sees_real_pooled_features(demo_teacher, teacher_engine, val_images):
    model = demo_teacher.model
    seen: dict[str, dict] = {}
    teacher_engine.capture = lambda name, inputs: seen.__setitem__(name, inputs)
    try:
        x, _ = letterbox(val_images[4], teacher_engine.size)
        result = teacher_engine.predict_letterboxed(x)
    finally:
        teacher_engine.capture = None
    assert list(seen) == ["backbone", "box_head", "mask_head"]
    np.testing.assert_array_equal(seen["backbone"]["image"], x)
    c = model.backbone.out_channels
    box_rois, mask_rois = seen["box_head"]["rois"], seen["mask_head"]["rois"]
    assert box_rois.dtype == np.float32 and box_rois.flags.c_contiguous
    assert box_rois.shape[1:] == (c, 7, 7)
    assert 0 < box_rois.shape[0] <= model.rpn._post_nms_top_n["testing"]
    assert mask_rois.shape == (len(result["scores"]), c, 14, 14)
    # the box head's inputs are what torchvision pools for its own proposals
    with torch.no_grad():
        batch, _ = model.transform([torch.from_numpy(x[0])])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        pooled = model.roi_heads.box_roi_pool(features, proposals, batch.image_sizes).numpy()
    assert pooled.shape == box_rois.shape
    assert np.abs(pooled - box_rois).max() <= 1e-4 * max(1.0, float(np.abs(pooled).max()))


def test_timings_cover_every_stage(teacher_engine, val_images):
    det = teacher_engine.predict(val_images[0])
    timings = teacher_engine.last_timings
    assert list(timings) == list(STAGES)
    assert len(det) > 0
    assert all(t > 0.0 for t in timings.values()), timings


# ---------------------------------------------------------------------------------------------
# host code against torchvision's ops, on random data


def _random_boxes(
    rng: np.random.Generator, n: int, size: float = 256.0, max_side: float = 120.0
) -> np.ndarray:
    xy = rng.uniform(-10, size, (n, 2))
    wh = rng.uniform(0.2, max_side, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(seed, threshold):
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 400, max_side=60)
    boxes[:20] = boxes[20:40]  # exact duplicates
    boxes[40:45, 2:] = boxes[40:45, :2]  # empty boxes
    scores = rng.random(400).astype(np.float32)
    scores[100:200] = np.round(scores[100:200] * 4) / 4  # ties
    ref = nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
    np.testing.assert_array_equal(pp.nms(boxes, scores, threshold), ref)
    np.testing.assert_array_equal(pp.nms(boxes, scores, threshold, max_keep=17), ref[:17])


@pytest.mark.parametrize("n", [300, 1500])  # coordinate-offset trick / per-class NMS
def test_batched_nms_matches_torchvision(n):
    rng = np.random.default_rng(n)
    boxes = _random_boxes(rng, n, max_side=50)
    scores = rng.random(n).astype(np.float32)
    idxs = rng.integers(0, 5, n)
    ref = batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), 0.5
    ).numpy()
    np.testing.assert_array_equal(pp.batched_nms(boxes, scores, idxs, 0.5), ref)
    np.testing.assert_array_equal(pp.batched_nms(boxes, scores, idxs, 0.5, max_keep=50), ref[:50])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_boxes_matches_box_coder(weights):
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 200)
    deltas = rng.normal(0, 2, (200, 4 * 4)).astype(np.float32)
    deltas[:10, 2] = 50.0  # beyond bbox_xform_clip
    ref = BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(boxes))
    got = pp.decode_boxes(deltas, boxes, weights)
    np.testing.assert_allclose(got.reshape(200, -1), ref.numpy(), rtol=1e-6, atol=1e-4)


def test_anchors_match_anchor_generator():
    sizes, ratios = (24, 48, 96, 192), (0.5, 1.0, 2.0)
    gen = AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * len(sizes))
    image = ImageList(torch.zeros(1, 3, 192, 192), [(192, 192)])
    grids = [(24, 24), (12, 12), (6, 6), (3, 3)]
    ref = gen(image, [torch.zeros(1, 8, *g) for g in grids])[0].numpy()
    got = np.concatenate(
        [
            pp.grid_anchors(pp.generate_cell_anchors([s], ratios), g, (192 // g[0], 192 // g[1]))
            for s, g in zip(sizes, grids, strict=True)
        ]
    )
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    ("output_size", "sampling_ratio"), [(7, 2), (14, 2), ((7, 5), 2), (7, 0), (7, -1)]
)
def test_roi_align_matches_torchvision(output_size, sampling_ratio):
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((1, 16, 32, 24)).astype(np.float32)
    boxes = _random_boxes(rng, 90, size=250, max_side=200)
    boxes[:5] -= 300  # entirely outside: samples below -1 are zero
    boxes[5:10] += 300  # beyond the far edge
    boxes[10:15, 2:] = boxes[10:15, :2] + 0.01  # tiny: width clamped to 1
    ref = roi_align(
        torch.from_numpy(feats), [torch.from_numpy(boxes)], output_size, 1 / 8, sampling_ratio
    ).numpy()
    got = pp.roi_align(feats, boxes, output_size, 1 / 8, sampling_ratio)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_multiscale_roi_align_matches_torchvision():
    rng = np.random.default_rng(7)
    names = ["0", "1", "2"]
    feats = {
        n: torch.from_numpy(rng.standard_normal((1, 8, 512 // s, 512 // s)).astype(np.float32))
        for n, s in zip(names, (8, 16, 32), strict=True)
    }
    boxes = np.clip(_random_boxes(rng, 150, size=300, max_side=500), 0, 512)
    boxes[:8] = [[0, 0, 500, 470], [10, 12, 480, 505], [3, 0, 512, 460], [0, 30, 470, 512]] * 2
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    pool = MultiScaleRoIAlign(names, 7, 2)
    ref = pool(feats, [torch.from_numpy(boxes)], [(512, 512)]).numpy()
    got = pp.multiscale_roi_align(
        [f.numpy() for f in feats.values()], boxes, 7, 2, [1 / 8, 1 / 16, 1 / 32]
    )
    levels = pp.map_levels(boxes, 3, 5)
    assert set(levels.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(levels, initLevelMapper(3, 5)([torch.from_numpy(boxes)]))
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_rpn_and_box_postprocessing_match_torchvision(tiny_student, val_images):
    model = tiny_student
    x, _ = letterbox(val_images[0], 128)
    with torch.no_grad():
        batch, _ = model.transform([torch.from_numpy(x[0])])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        logits, deltas = model.rpn.head(list(features.values()))
        anchors = model.rpn.anchor_generator(batch, list(features.values()))[0].numpy()
    sizes = [f.shape[-2] * f.shape[-1] * 3 for f in features.values()]
    per_level = np.split(anchors, np.cumsum(sizes)[:-1])
    rpn = model.rpn
    got, _ = pp.rpn_proposals(
        [t.numpy() for t in logits],
        [t.numpy() for t in deltas],
        per_level,
        (128, 128),
        pre_nms_top_n=rpn._pre_nms_top_n["testing"],
        post_nms_top_n=rpn._post_nms_top_n["testing"],
        nms_thresh=rpn.nms_thresh,
        score_thresh=rpn.score_thresh,
        min_size=rpn.min_size,
    )
    assert got.shape == proposals[0].shape
    np.testing.assert_allclose(got, proposals[0].numpy(), atol=1e-4)

    rng = np.random.default_rng(0)
    n, k = 80, model.roi_heads.box_predictor.cls_score.out_features
    class_logits = rng.normal(0, 3, (n, k)).astype(np.float32)
    box_deltas = rng.normal(0, 1, (n, 4 * k)).astype(np.float32)
    props = np.clip(_random_boxes(rng, n, size=120, max_side=60), 0, 128)
    ref_boxes, ref_scores, ref_labels = model.roi_heads.postprocess_detections(
        torch.from_numpy(class_logits),
        torch.from_numpy(box_deltas),
        [torch.from_numpy(props)],
        [(128, 128)],
    )
    boxes, scores, labels = pp.box_detections(
        class_logits,
        box_deltas,
        props,
        (128, 128),
        score_thresh=model.roi_heads.score_thresh,
        nms_thresh=model.roi_heads.nms_thresh,
        detections_per_img=model.roi_heads.detections_per_img,
    )
    assert len(labels) == model.roi_heads.detections_per_img
    np.testing.assert_array_equal(labels, ref_labels[0].numpy())
    np.testing.assert_allclose(boxes, ref_boxes[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores[0].numpy(), atol=1e-6)

    mask_logits = rng.normal(0, 4, (len(labels), k, 28, 28)).astype(np.float32)
    ref_masks = maskrcnn_inference(torch.from_numpy(mask_logits), [torch.from_numpy(labels)])[0]
    np.testing.assert_allclose(pp.select_masks(mask_logits, labels), ref_masks[:, 0], atol=1e-6)


def test_paste_masks_matches_torchvision():
    rng = np.random.default_rng(11)
    masks = rng.random((12, 28, 28)).astype(np.float32)
    boxes = _random_boxes(rng, 12, size=150, max_side=90)
    ref = paste_masks_in_image(
        torch.from_numpy(masks[:, None]), torch.from_numpy(boxes), (150, 170)
    )
    np.testing.assert_allclose(pp.paste_masks(masks, boxes, 150, 170), ref[:, 0].numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# backends and bundles


def test_backend_options_reach_the_session(student_bundle):
    path = student_bundle / "models" / "fp32" / "box_head.onnx"
    graph = make_backend(
        "onnxruntime",
        path,
        {
            "intra_op_num_threads": 1,
            "graph_optimization_level": "basic",
            "execution_mode": "parallel",
            "providers": ["CPUExecutionProvider"],
            "allow_spinning": False,
        },
    )
    options = graph.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert graph.session.get_providers() == ["CPUExecutionProvider"]
    out = graph({"rois": np.zeros((3, 128, 7, 7), np.float32)})
    assert list(out) == ["class_logits", "box_deltas"]
    assert out["class_logits"].shape == (3, 4) and out["box_deltas"].shape == (3, 16)
    sequential = make_backend("onnxruntime", path, {"inter_op_num_threads": 3})
    assert sequential.session.get_session_options().inter_op_num_threads == 3
    default = make_backend("onnxruntime", path)
    assert default.session.get_providers()[-1] == "CPUExecutionProvider"
    assert (
        default.session.get_session_options().graph_optimization_level
        == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("coreml", {}, "unknown backend 'coreml'; available: litert, onnxruntime, openvino"),
        ("onnxruntime", {"threads": 2}, "unknown onnxruntime options ['threads']"),
        ("onnxruntime", {"intra_op_num_threads": -1}, "expected an integer >= 0"),
        ("onnxruntime", {"graph_optimization_level": "max"}, "disable, basic, extended, all"),
        ("onnxruntime", {"execution_mode": "async"}, "sequential, parallel"),
        ("onnxruntime", {"allow_spinning": "no"}, "allow_spinning='no': expected true/false"),
        ("onnxruntime", {"providers": ["NoSuchExecutionProvider"]}, "not in this onnxruntime"),
    ],
)
def test_backend_errors_say_what_to_do(student_bundle, kind, options, message):
    path = student_bundle / "models" / "fp32" / "box_head.onnx"
    with pytest.raises(RunnerError) as info:
        make_backend(kind, path, options)
    assert message in str(info.value)


def test_bundle_loading(student_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(student_bundle, bundle)
    (bundle / "manifest.json").write_text(
        json.dumps(
            {
                "runtime": {
                    "options": {"intra_op_num_threads": 1, "graph_optimization_level": "basic"}
                }
            }
        )
    )
    engine = Engine.from_dir(bundle, precision="fp32")
    options = engine.graphs["backbone"].session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    engine = Engine.from_dir(bundle, precision="fp32", runtime_options={"intra_op_num_threads": 2})
    options = engine.graphs["mask_head"].session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC

    with pytest.raises(RunnerError, match=r"no int8 models in this bundle \(it has: fp32\)"):
        Engine.from_dir(bundle)
    with pytest.raises(RunnerError, match="is not a maskedge bundle"):
        Engine.from_dir(tmp_path)

    # a new runtime is one registry entry; the engine calls whatever it returns
    opened = []

    def fake_backend(path: Path, options: dict) -> GraphFn:
        opened.append((path.name, dict(options)))
        return make_backend("onnxruntime", path, {})

    monkeypatch.setitem(BACKENDS, "fake", fake_backend)
    engine = Engine.from_dir(bundle, precision="fp32", backend="fake")
    assert sorted(name for name, _ in opened) == [
        "backbone.onnx",
        "box_head.onnx",
        "mask_head.onnx",
    ]
    assert opened[0][1]["intra_op_num_threads"] == 1
    assert engine.predict(_blank(90, 120, 40)).masks.shape[1:] == (90, 120)


# ---------------------------------------------------------------------------------------------
# command line and imports


@pytest.fixture(scope="module")
def cli_bundle(teacher_bundle, demo_teacher, tmp_path_factory) -> Path:
    """The teacher's graphs with a manifest that names the classes."""
    bundle = tmp_path_factory.mktemp("cli") / "bundle"
    bundle.mkdir()
    shutil.copy(teacher_bundle / "graph_spec.json", bundle)
    (bundle / "models").symlink_to(teacher_bundle / "models", target_is_directory=True)
    classes = [
        {"label": i, "name": name, "category_id": cat}
        for i, (name, cat) in enumerate(
            zip(demo_teacher.class_names, demo_teacher.category_ids, strict=True), start=1
        )
    ]
    (bundle / "manifest.json").write_text(json.dumps({"classes": classes}))
    return bundle


def test_cli_prints_detections_and_writes_overlays(
    cli_bundle, demo_teacher, val_images, tmp_path, capsys
):
    paths = []
    for i, image in enumerate([val_images[0], _resized(val_images[1], 150, 210)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image).save(paths[-1])
    out = tmp_path / "overlays"
    score = 0.3
    args = [str(cli_bundle), "--precision", "fp32", "--score", str(score), "--out", str(out)]
    for p in paths:
        args += ["--image", str(p)]
    assert runner_main(args) == 0
    printed = capsys.readouterr().out
    engine = Engine.from_dir(cli_bundle, precision="fp32")
    for p in paths:
        image = np.asarray(Image.open(p).convert("RGB"))
        det = engine.predict(image)
        shown = det.scores >= score
        assert shown.any()
        assert f"{p}: {int(shown.sum())} detections with score >= {score:g}" in printed
        for label in det.labels[shown]:
            assert f"  {demo_teacher.class_names[label - 1]} " in printed
        overlay = np.asarray(Image.open(out / f"{p.stem}.overlay.png"))
        assert overlay.shape == image.shape
        # pixels inside the best detection's mask are tinted; pixels away from every shown box
        # and its label are untouched
        inside = det.masks[0] > 0.5
        assert np.abs(overlay[inside].astype(int) - image[inside]).mean() > 5
        away = np.ones(image.shape[:2], bool)
        for x0, y0, x1, y1 in det.boxes[shown]:
            mx, my = 0.1 * (x1 - x0) + 3, 0.1 * (y1 - y0) + 3
            away[
                max(int(y0 - my) - 14, 0) : int(y1 + my) + 1,
                max(int(x0 - mx), 0) : int(max(x1 + mx, x0 + 100)) + 1,
            ] = False
        assert away.sum() > 0.1 * away.size
        np.testing.assert_array_equal(overlay[away], image[away])

    assert runner_main([str(cli_bundle), "--precision", "fp32", "--image", "nope.png"]) == 1
    assert capsys.readouterr().err.startswith("maskedge_runner: nope.png: ")
    assert runner_main([str(cli_bundle), "--image", str(paths[0])]) == 1
    assert "no int8 models in this bundle" in capsys.readouterr().err


def test_cli_warns_when_the_bundle_failed_its_gate(cli_bundle, val_images, tmp_path, capsys):
    bundle = tmp_path / "failed"
    shutil.copytree(cli_bundle, bundle, symlinks=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(status="failed", gate={"reasons": ["mask_ap_drop = 3.0 (limit 1.0)"]})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    image = tmp_path / "probe.png"
    Image.fromarray(val_images[0]).save(image)

    assert runner_main([str(bundle), "--precision", "fp32", "--image", str(image),
                        "--out", str(tmp_path / "out")]) == 0

    err = capsys.readouterr().err
    assert "warning: this bundle failed its build gate (mask_ap_drop = 3.0 (limit 1.0))" in err


_IMPORT_PROBE = """
import json, runpy, sys
sys.argv = ["maskedge_runner"] + sys.argv[1:]
try:
    runpy.run_module("maskedge_runner", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    assert not exit.code, exit.code
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""

_BASELINE_PROBE = """
import json, sys
import numpy, PIL.Image, PIL.ImageDraw, PIL.PngImagePlugin, onnxruntime
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""


def _modules(code: str, *args: str, cwd: Path) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES="))
    return {name.split(".")[0] for name in json.loads(line[len("MODULES=") :])}


def test_runner_imports_only_numpy_pillow_onnxruntime(cli_bundle, val_images, tmp_path):
    image = tmp_path / "probe.png"
    Image.fromarray(val_images[0]).save(image)
    # a copy of the runner package alone, so nothing else of the repository is importable
    shutil.copytree(REPO / "maskedge_runner", tmp_path / "maskedge_runner")
    args = [str(cli_bundle), "--image", str(image), "--precision", "fp32", "--out", str(tmp_path)]
    used = _modules(_IMPORT_PROBE, *args, cwd=tmp_path)
    assert (tmp_path / "probe.overlay.png").is_file()
    baseline = _modules(_BASELINE_PROBE, cwd=tmp_path)
    extra = used - baseline - set(sys.stdlib_module_names) - {"maskedge_runner"}
    assert extra == set(), f"the runner imports {sorted(extra)}"
    assert not used & {"torch", "torchvision", "pipeline", "onnx", "pycocotools", "scipy"}
    assert {"numpy", "PIL", "onnxruntime", "maskedge_runner"} <= used


def test_runner_works_in_a_venv_with_only_numpy_pillow_and_onnxruntime(cli_bundle, val_images,
                                                                        tmp_path):
    from runner_venv import bare_venv

    python = bare_venv(tmp_path / "env", ["numpy", "pillow", "onnxruntime"])
    shutil.copytree(REPO / "maskedge_runner", tmp_path / "maskedge_runner")
    image = tmp_path / "probe.png"
    Image.fromarray(val_images[0]).save(image)
    run = subprocess.run(
        [str(python), "-m", "maskedge_runner", str(cli_bundle), "--image", str(image),
         "--precision", "fp32", "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "probe.overlay.png").is_file()
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0  # the venv really lacks the build's packages
