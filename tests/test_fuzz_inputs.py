"""Property tests: malformed COCO files, corrupted images and odd checkpoints fed to the loaders.

Whatever the input, the only exceptions that may come out are maskedge's own
(:class:`~pipeline.errors.MaskedgeError` subclasses, and the runner's ``ImageReadError`` from
``maskedge_runner.preprocess``); whatever loads must satisfy the documented invariants.

Runs in CI with modest, derandomised example counts; ``MASKEDGE_FUZZ_SCALE=20`` multiplies the
counts and draws fresh random examples, for a longer local hunt.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from maskedge_runner.detections import Detections
from maskedge_runner.preprocess import ImageReadError, load_image
from pipeline.checkpoint import load_checkpoint
from pipeline.datasets import CocoInstances, read_images
from pipeline.errors import DatasetError, MaskedgeError

SCALE = float(os.environ.get("MASKEDGE_FUZZ_SCALE", "1"))
H, W = 24, 32


def _settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- strategies ------------------------------------------------------------------------------------

COCO_KEYS = [
    "images",
    "annotations",
    "categories",
    "id",
    "image_id",
    "category_id",
    "bbox",
    "segmentation",
    "area",
    "iscrowd",
    "file_name",
    "width",
    "height",
    "name",
    "size",
    "counts",
]
numbers = (
    st.integers(-(2**40), 2**40)
    | st.integers(-3, 70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(-5, 70)
)
scalars = (
    st.none()
    | st.booleans()
    | numbers
    | st.text(max_size=6)
    | st.sampled_from(["img1.png", "img2.png", "missing.png", "../img1.png", "0"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(COCO_KEYS) | st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=24,
)
polygons = st.lists(st.lists(numbers, max_size=12), max_size=3)
rle_counts = (
    st.lists(st.integers(-2, H * W + 2), max_size=8)
    | st.lists(st.integers(0, 200), min_size=1, max_size=12).map(
        lambda runs: [*runs, max(0, H * W - sum(runs))]
    )
    | st.text(alphabet=[chr(c) for c in range(40, 115)], max_size=12)
)
rles = st.fixed_dictionaries(
    {
        "size": st.sampled_from([[H, W], [W, H], [H, W + 1], [0, 0]])
        | st.lists(numbers, max_size=3),
        "counts": rle_counts | scalars,
    }
)
bboxes = st.lists(numbers, max_size=5)
field_values = json_values | polygons | rles | bboxes | numbers


def _base_document() -> dict[str, Any]:
    """A valid COCO file with every kind of segmentation: the seed that mutations start from."""
    obj = np.zeros((H, W), np.uint8)
    obj[2:10, 3:15] = 1
    rle = mask_utils.encode(np.asfortranarray(obj))
    flat = obj.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {
        "images": [
            {"id": 1, "file_name": "img1.png", "width": W, "height": H},
            {"id": 2, "file_name": "img2.png", "width": W, "height": H},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [3, 2, 12, 8],
                "area": 96,
                "iscrowd": 0,
                "segmentation": [[3, 2, 15, 2, 15, 10, 3, 10]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 5,
                "bbox": [3, 2, 12, 8],
                "area": 96,
                "iscrowd": 0,
                "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 1,
                "bbox": [3, 2, 12, 8],
                "area": 96,
                "iscrowd": 1,
                "segmentation": {"size": [H, W], "counts": runs},
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 5,
                "bbox": [20, 12, 8, 8],
                "area": 64,
                "iscrowd": 0,
            },
        ],
    }


def _containers(node: Any) -> Iterator[dict[str, Any] | list[Any]]:
    if isinstance(node, (dict, list)):
        yield node
        for child in node.values() if isinstance(node, dict) else node:
            yield from _containers(child)


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    doc = _base_document()
    for _ in range(draw(st.integers(1, 5))):
        target = draw(st.sampled_from(list(_containers(doc))))
        action = draw(st.sampled_from(["set", "set", "delete"]))
        if isinstance(target, dict):
            key = draw(st.sampled_from(sorted(set(target) | set(COCO_KEYS[:12]))))
            if action == "delete":
                target.pop(key, None)
            else:
                target[key] = copy.deepcopy(draw(field_values))  # drawn values may be shared
        elif target:
            index = draw(st.integers(0, len(target) - 1))
            if action == "delete":
                del target[index]
            else:
                target[index] = copy.deepcopy(draw(field_values))
        else:
            target.append(copy.deepcopy(draw(field_values)))
    return doc


# -- COCO ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in ("img1.png", "img2.png"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
    return root


def _load_and_check(root: Path, document: Any) -> None:
    """Load ``document``; only DatasetError may escape; what loads must be consistent."""
    from pipeline.evaluate import evaluate_coco

    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(document))
    try:
        data = CocoInstances(ann_file, root / "images")
    except DatasetError:
        event("DatasetError")
        return
    event(f"loaded, {data.quality.annotations > 0 and 'with' or 'without'} annotations")

    json.dumps(data.quality.to_dict())
    assert data.quality.images == len(data.image_ids) > 0
    labels = set(data.label_to_cat)
    for image_id in data.image_ids:
        info = data.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        target = data.target(image_id)
        boxes, masks = target["boxes"], target["masks"]
        n = len(boxes)
        assert boxes.shape == (n, 4) and target["labels"].shape == (n,)
        assert masks.shape == (n, h, w) and masks.dtype == np.uint8
        assert np.isfinite(boxes).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert set(np.unique(masks)) <= {0, 1}
        assert (masks.sum(axis=(1, 2)) > 0).all()
        assert set(target["labels"].tolist()) <= labels
    for ann in data.coco.anns.values():
        assert math.isfinite(ann["area"]) and ann["area"] > 0

    def predict(image: np.ndarray) -> Detections:
        mask = np.zeros((1, *image.shape[:2]), np.float32)
        mask[0, 2:10, 3:15] = 1.0
        return Detections(
            np.array([[3, 2, 15, 10]], np.float32),
            np.array([0.9], np.float32),
            np.array([1], np.int64),
            mask,
        )

    metrics = evaluate_coco(predict, data)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("box_ap", "mask_ap"))


@_settings(40)
@given(document=json_values)
def test_random_json_gives_a_set_or_a_dataset_error(coco_dir: Path, document: Any) -> None:
    _load_and_check(coco_dir, document)


@_settings(80)
@given(document=mutated_documents())
def test_mutated_coco_gives_a_consistent_set_or_a_dataset_error(
    coco_dir: Path, document: Any
) -> None:
    _load_and_check(coco_dir, document)


def test_the_unmutated_seed_document_loads(coco_dir: Path) -> None:
    """Guards the property tests: their seed must itself be a clean, complete set."""
    ann_file = coco_dir / "seed.json"
    ann_file.write_text(json.dumps(_base_document()))
    data = CocoInstances(ann_file, coco_dir / "images")
    assert data.quality.dropped == {} and data.quality.annotations == 4
    assert data.quality.crowd == 1
    assert len(data.target(1)["boxes"]) == 2 and len(data.target(2)["boxes"]) == 1


# -- images ----------------------------------------------------------------------------------------


def _encoded(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8))
    buf = io.BytesIO()
    base.convert(mode).save(buf, fmt)
    return buf.getvalue()


SEEDS = {
    f"{fmt}-{mode}": _encoded(fmt, mode)
    for fmt, mode in [
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
        ("WEBP", "RGB"),
        ("PPM", "RGB"),
    ]
}


@st.composite
def corrupted_images(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            index = draw(st.integers(0, min(len(data), 40) - 1))
            data[index] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_images")


@_settings(120)
@given(data=corrupted_images(), suffix=st.sampled_from([".png", ".jpg", ".gif", ".img"]))
def test_corrupted_image_bytes_give_rgb_or_image_read_error(
    image_dir: Path, data: bytes, suffix: str
) -> None:
    path = image_dir / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except ImageReadError as err:
        event("ImageReadError")
        assert str(path) in str(err)
    else:
        event("decoded")
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        assert image.shape[0] >= 1 and image.shape[1] >= 1

    try:
        kept, arrays = read_images([path, image_dir / "missing.png"])
    except DatasetError as err:
        assert "none of the 2 images" in str(err)
    else:
        assert kept == [path] and arrays[0].shape[2] == 3


# -- checkpoints -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_state() -> dict[str, torch.Tensor]:
    """A real (small) maskedge student's weights, shared by the checkpoint properties."""
    from pipeline.models import build_model, student_spec

    torch.manual_seed(0)
    return build_model(student_spec(num_classes=3, image_size=64)).state_dict()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_ckpt")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _drop_key(state: dict[str, torch.Tensor], key: str, draw: st.DrawFn) -> None:
    state.pop(key, None)


def _reshape_key(state: dict[str, torch.Tensor], key: str, draw: st.DrawFn) -> None:
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    state[key] = torch.zeros(shape)


def _retype_key(state: dict[str, torch.Tensor], key: str, draw: st.DrawFn) -> None:
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.bool]))
    state[key] = state[key].to(dtype) if key in state else torch.zeros(1, dtype=dtype)


def _rename_key(state: dict[str, torch.Tensor], key: str, draw: st.DrawFn) -> None:
    if key in state:
        state[draw(st.text(min_size=1, max_size=12))] = state.pop(key)


MUTATIONS: list[Callable[[dict[str, torch.Tensor], str, st.DrawFn], None]] = [
    _drop_key,
    _reshape_key,
    _retype_key,
    _rename_key,
]


@_settings(12)
@given(data=st.data())
def test_odd_checkpoints_load_or_give_a_maskedge_error(
    ckpt_dir: Path, real_state: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    """Real weights with a few keys dropped, reshaped, retyped or renamed, then wrapped in
    random training-checkpoint structure: a model, or an error of maskedge's own."""
    state = dict(real_state)
    keys = sorted(state)
    for _ in range(data.draw(st.integers(0, 3))):
        mutate = data.draw(st.sampled_from(MUTATIONS))
        mutate(state, data.draw(st.sampled_from(keys)), data.draw)
    prefix = data.draw(st.sampled_from(["", "module.", "_orig_mod.", "model.", "x.", "module"]))
    obj: Any = {prefix + k: v for k, v in state.items()}
    for _ in range(data.draw(st.integers(0, 2))):
        key = data.draw(st.sampled_from(["model", "state_dict", "ema", "weights", "other"]))
        extra = data.draw(
            st.dictionaries(
                st.sampled_from(["epoch", "names", "classes"]),
                scalars | st.lists(st.text(max_size=3), max_size=4),
                max_size=2,
            )
        )
        obj = {key: obj, **extra}
    num_classes = data.draw(st.none() | st.integers(1, 6))
    path = ckpt_dir / "fuzz.pt"
    torch.save(obj, path)
    try:
        loaded = load_checkpoint(path, num_classes=num_classes)
    except MaskedgeError as err:
        event(type(err).__name__)
        return
    event("loaded")
    assert loaded.num_classes == num_classes or num_classes is None
    assert len(loaded.class_names) == len(loaded.category_ids) == loaded.num_classes - 1
    assert not loaded.model.training
    with torch.no_grad():
        (result,) = loaded.model([torch.rand(3, 64, 64)])
    assert result["boxes"].shape[1:] == (4,) and result["boxes"].dtype == torch.float32


@_settings(25)
@given(data=st.data())
def test_corrupted_checkpoint_bytes_give_a_checkpoint_error(
    ckpt_dir: Path, data: st.DataObject
) -> None:
    buf = io.BytesIO()
    torch.save(
        {"model": {"roi_heads.box_predictor.cls_score.weight": torch.ones(3, 4)}, "epoch": 1}, buf
    )
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[pos] ^= data.draw(st.integers(1, 255))
        else:
            del raw[pos:]
            if not raw:
                break
    path = ckpt_dir / "corrupt.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(MaskedgeError):  # the weights are no Mask R-CNN even when they load
        load_checkpoint(path)
