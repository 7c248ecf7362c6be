"""Checkpoints as users bring them: torchvision layouts, wrappers, prefixes, pickles, class names.

Every state_dict here is built by the test from a randomly initialised model; "loads correctly"
means the model maskedge rebuilds gives bit-identical detections to the model that was saved.
Cases from ../shared/cases: B16 (prefixes), B17 (wrapped dict, class count), B18 (whole pickled
model), B19 (extra Python objects, weights-only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone

from pipeline.checkpoint import LoadedModel, load_checkpoint
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import build_model, student_spec, teacher_spec

SIZE = 64  # every model runs at 64 px here, to keep the tests quick


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are small: one thread is faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, SIZE, SIZE + 32, generator=g)]


def _detect(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detections on a fixed image, with small RoI budgets (the heads dominate CPU time)."""
    model.eval()
    model.rpn._pre_nms_top_n["testing"] = 200
    model.rpn._post_nms_top_n["testing"] = 40
    model.roi_heads.detections_per_img = 8
    with torch.no_grad():
        return model(_image())[0]


def _at_size(model: nn.Module, min_size: int = SIZE, max_size: int = SIZE) -> nn.Module:
    model.transform.min_size = (min_size,)
    model.transform.max_size = max_size
    return model.eval()


def _assert_same_detections(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b) == {"boxes", "labels", "scores", "masks"}
    assert len(a["boxes"]) > 0, "a random-weight model should still emit detections"
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _resnet18_fpn(num_classes: int = 3) -> MaskRCNN:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return MaskRCNN(backbone, num_classes=num_classes)


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """maskrcnn_resnet50_fpn(num_classes=5) saved as a DDP training checkpoint, with its output."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("r50") / "model_3.pth"
    torch.save({"model": state, "optimizer": opt.state_dict(), "epoch": 3}, path)
    return path, _detect(_at_size(model))


@pytest.fixture(scope="module")
def resnet18_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A torchvision ResNet-18 FPN Mask R-CNN (3 classes): its state_dict and its output."""
    model = _resnet18_fpn()
    return model.state_dict(), _detect(_at_size(model))


# -- B16, B17: wrapped, prefixed torchvision checkpoints -------------------------------------------


def test_b16_module_prefix_stripped(
    resnet50_checkpoint: tuple[Path, dict], caplog: pytest.LogCaptureFixture
) -> None:
    """B16: keys all start with ``module.``: stripped (logged), then loaded strictly."""
    path, expected = resnet50_checkpoint
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint"):
        loaded = load_checkpoint(path, min_size=SIZE, max_size=SIZE)

    assert "stripping the 'module.' prefix" in caplog.text
    assert loaded.arch == "maskrcnn_resnet50_fpn"
    assert loaded.spec is None
    assert loaded.num_classes == 5
    assert loaded.image_size == SIZE
    assert loaded.metadata["loaded_as"]["stripped_prefixes"] == ["module."]
    assert loaded.metadata["loaded_as"]["weights_key"] == "model"
    assert loaded.metadata["checkpoint_fields"]["epoch"] == 3
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    _assert_same_detections(_detect(loaded.model), expected)


def test_b17_num_classes_read_from_predictor(resnet50_checkpoint: tuple[Path, dict]) -> None:
    """B17: ``{"model", "optimizer", "epoch"}`` trained with 5 classes; no config needed."""
    path, _ = resnet50_checkpoint
    loaded = load_checkpoint(path, num_classes=5, min_size=SIZE, max_size=SIZE)
    assert loaded.num_classes == 5
    assert loaded.class_names == ["class_1", "class_2", "class_3", "class_4"]
    assert loaded.category_ids == [1, 2, 3, 4]
    assert loaded.label_to_cat == {1: 1, 2: 2, 3: 3, 4: 4}


def test_b17_num_classes_mismatch_gives_both_numbers(
    tmp_path: Path, resnet18_state: tuple[dict, dict]
) -> None:
    """B17: trained with 3 classes while the config says 91: stop, naming 3 and 91."""
    state, _ = resnet18_state
    opt = {"state": {}, "param_groups": [{"lr": 0.02, "params": [0, 1]}]}
    path = _save({"model": state, "optimizer": opt, "epoch": 12}, tmp_path / "ckpt.pth")

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, num_classes=91)
    message = str(err.value)
    assert str(path) in message
    assert "num_classes=3" in message and "num_classes=91" in message

    with pytest.raises(CheckpointError, match="counts the background class"):
        load_checkpoint(path, num_classes=2)
    assert load_checkpoint(path, num_classes=3, min_size=SIZE, max_size=SIZE).num_classes == 3


# -- every architecture family, read from the weights alone ----------------------------------------


def _mobilenet_fpn() -> MaskRCNN:
    torch.manual_seed(0)
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large", fpn=True, weights=None, trainable_layers=3
    )
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(backbone, num_classes=4, rpn_anchor_generator=anchors)


def _resnet50_v2() -> MaskRCNN:
    torch.manual_seed(0)
    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=7)


def _resnext50_fpn() -> MaskRCNN:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnext50_32x4d", weights=None)
    return MaskRCNN(backbone, num_classes=3)


def _mobilenet_small_fpn() -> MaskRCNN:
    torch.manual_seed(0)
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_small", fpn=True, weights=None, trainable_layers=6
    )
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors)


def _resnet34_fpn_three_levels() -> MaskRCNN:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet34", weights=None, trainable_layers=3, returned_layers=[2, 3, 4]
    )
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 4)
    return MaskRCNN(backbone, num_classes=6, rpn_anchor_generator=anchors)


@pytest.mark.parametrize(
    ("build", "arch", "num_classes"),
    [
        (_resnet50_v2, "maskrcnn_resnet50_fpn_v2", 7),
        (_mobilenet_fpn, "maskrcnn_mobilenet_v3_large_fpn", 4),
        (_resnet34_fpn_three_levels, "maskrcnn_resnet34_fpn", 6),
        (_resnet18_fpn, "maskrcnn_resnet18_fpn", 3),
        (_resnext50_fpn, "maskrcnn_resnext50_32x4d_fpn", 3),
        (_mobilenet_small_fpn, "maskrcnn_mobilenet_v3_small_fpn", 2),
    ],
)
def test_torchvision_layouts_are_read_from_weights(
    tmp_path: Path, build: Callable[[], MaskRCNN], arch: str, num_classes: int
) -> None:
    model = build()
    path = _save(model.state_dict(), tmp_path / "weights.pt")
    expected = _detect(_at_size(model))
    del model

    loaded = load_checkpoint(path, min_size=SIZE, max_size=SIZE)

    assert loaded.arch == arch
    assert loaded.num_classes == num_classes
    assert loaded.metadata["loaded_as"]["layout"]["num_classes"] == num_classes
    _assert_same_detections(_detect(loaded.model), expected)


def test_custom_min_max_size(tmp_path: Path, resnet18_state: tuple[dict, dict]) -> None:
    state, _ = resnet18_state
    path = _save(state, tmp_path / "r18.pt")

    default = load_checkpoint(path)
    custom = load_checkpoint(path, min_size=320, max_size=480)

    assert (default.model.transform.min_size, default.model.transform.max_size) == ((800,), 1333)
    assert default.image_size == 800
    assert (custom.model.transform.min_size, custom.model.transform.max_size) == ((320,), 480)
    assert custom.image_size == 320
    with pytest.raises(ConfigError, match="min_size=0"):
        load_checkpoint(path, min_size=0)


def test_legacy_torchvision_key_names(tmp_path: Path, resnet18_state: tuple[dict, dict]) -> None:
    """Checkpoints from torchvision < 0.13 name FPN, RPN and mask-head convs differently."""
    state, expected = resnet18_state
    legacy = {}
    for key, value in state.items():
        key = (
            key.replace("inner_blocks.0.0.", "inner_blocks.0.")
            .replace("layer_blocks.3.0.", "layer_blocks.3.")
            .replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        )
        for i in range(4):
            key = key.replace(
                f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}."
            )
        legacy[key] = value
    assert "roi_heads.mask_head.mask_fcn1.weight" in legacy and "rpn.head.conv.weight" in legacy

    loaded = load_checkpoint(_save(legacy, tmp_path / "old.pt"), min_size=SIZE, max_size=SIZE)

    _assert_same_detections(_detect(loaded.model), expected)


# -- maskedge's own architectures and format -------------------------------------------------------


def test_maskedge_checkpoint_format_round_trip(tmp_path: Path) -> None:
    from pipeline.train import save_checkpoint

    torch.manual_seed(0)
    spec = teacher_spec(num_classes=4).with_(image_size=SIZE)
    model = build_model(spec).eval()
    path = tmp_path / "teacher.pt"
    save_checkpoint(
        model,
        spec,
        ["disk", "block", "wedge"],
        [11, 12, 13],
        path,
        fp16=False,
        extra={"metadata": {"val_metrics": {"mask_ap50": 0.5}}},
    )

    loaded = load_checkpoint(path)

    assert loaded.spec == spec
    assert loaded.arch == "maskedge_resnet18"
    assert loaded.image_size == SIZE
    assert loaded.class_names == ["disk", "block", "wedge"]
    assert loaded.category_ids == [11, 12, 13]
    assert loaded.label_to_cat == {1: 11, 2: 12, 3: 13}
    assert loaded.metadata["val_metrics"] == {"mask_ap50": 0.5}
    _assert_same_detections(_detect(loaded.model), _detect(model))
    with pytest.raises(CheckpointError, match="num_classes=4"):
        load_checkpoint(path, num_classes=3)
    with pytest.raises(CheckpointError, match="maskedge_resnet18"):
        load_checkpoint(path, arch="maskrcnn_resnet50_fpn")


def test_arch_option_chooses_between_readings(tmp_path: Path) -> None:
    """A plain state_dict of maskedge's ResNet-18 also reads as a torchvision ResNet-18 FPN."""
    torch.manual_seed(0)
    model = build_model(teacher_spec(num_classes=3).with_(image_size=SIZE)).eval()
    path = _save(model.state_dict(), tmp_path / "plain.pt")

    default = load_checkpoint(path, min_size=SIZE)
    as_torchvision = load_checkpoint(
        path, arch="maskrcnn_resnet18_fpn", min_size=SIZE, max_size=SIZE
    )

    assert default.arch == "maskedge_resnet18"
    assert default.spec is not None and default.spec.image_size == SIZE
    _assert_same_detections(_detect(default.model), _detect(model))
    assert as_torchvision.arch == "maskrcnn_resnet18_fpn" and as_torchvision.spec is None
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="maskrcnn_resnet50_fpn")
    assert "maskedge_resnet18" in str(err.value) and "maskrcnn_resnet50_fpn" in str(err.value)
    with pytest.raises(ConfigError, match="not an architecture name"):
        load_checkpoint(path, arch="yolov8")


def _student_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(student_spec(num_classes=3, image_size=SIZE)).state_dict()


@pytest.mark.parametrize(
    "prefixes", [["_orig_mod."], ["model."], ["module.", "_orig_mod."], ["detector."]]
)
def test_wrapper_prefixes_stripped(tmp_path: Path, prefixes: list[str]) -> None:
    """torch.compile, Lightning, DDP around compile, and a user's own wrapper module."""
    state = _student_state(0)
    prefix = "".join(prefixes)
    path = _save({"state_dict": {prefix + k: v for k, v in state.items()}}, tmp_path / "c.pt")

    loaded = load_checkpoint(path)

    assert loaded.metadata["loaded_as"]["stripped_prefixes"] == prefixes
    assert loaded.arch == "maskedge_mobilenet_v3_large"
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key].float()), key


def test_ema_weights_preferred(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    live, ema = _student_state(0), _student_state(1)
    averaged = {"module." + k: v for k, v in ema.items()} | {"n_averaged": torch.tensor(100)}
    path = _save({"model": live, "model_ema": averaged, "epoch": 30}, tmp_path / "ema.pt")

    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint"):
        loaded = load_checkpoint(path)

    assert "using the weights under 'model_ema' (also present: model)" in caplog.text
    assert loaded.metadata["loaded_as"]["weights_key"] == "model_ema"
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(loaded.model.state_dict()[key], ema[key])
    assert not torch.equal(loaded.model.state_dict()[key], live[key])


# -- B18, B19: pickles -----------------------------------------------------------------------------


def _init_teacher_net(self: nn.Module) -> None:
    nn.Module.__init__(self)
    self.detector = build_model(student_spec(num_classes=3, image_size=SIZE))


def test_b18_whole_model_from_training_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B18: ``torch.save(model)`` where the class lived in the training script's ``__main__``."""
    teacher_net = type(
        "TeacherNet", (nn.Module,), {"__init__": _init_teacher_net, "__module__": "__main__"}
    )
    path = tmp_path / "whole.pt"
    with monkeypatch.context() as patch:  # as if defined in the script that ran torch.save
        patch.setattr(sys.modules["__main__"], "TeacherNet", teacher_net, raising=False)
        torch.save(teacher_net(), path)

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "whole pickled model" in message and "TeacherNet" in message
    assert "__main__" in message and "torch.save(model.state_dict()" in message

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, trust=True)
    assert "TeacherNet" in str(err.value) and "__main__" in str(err.value)
    assert "torch.save(model.state_dict()" in str(err.value)


def test_b18_whole_torchvision_model_needs_trust(tmp_path: Path) -> None:
    """A whole pickled torchvision model: refused by default, read under trust with its own
    input size and anchors (which weights alone do not carry)."""
    torch.manual_seed(0)
    anchors = AnchorGenerator(((16,), (40,), (80,), (160,), (320,)), ((0.5, 1.0, 2.0),) * 5)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(
        backbone, num_classes=3, rpn_anchor_generator=anchors, min_size=160, max_size=192
    ).eval()
    path = _save(model, tmp_path / "whole_tv.pt")

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "torchvision.models.detection.mask_rcnn.MaskRCNN" in message
    assert "--trust-checkpoint" in message

    loaded = load_checkpoint(path, trust=True)
    assert loaded.image_size == 160
    assert loaded.metadata["loaded_as"]["anchor_sizes"] == [[16], [40], [80], [160], [320]]
    assert loaded.metadata["loaded_as"]["trusted"] is True
    _assert_same_detections(_detect(loaded.model), _detect(model))


MARKER: dict[str, Path] = {}


def _side_effect(name: str) -> dict[str, str]:
    """Runs when unpickled: proof that loading executed code from the file."""
    MARKER[name].write_text("unpickled")
    return {"note": "ran"}


class _TrainConfig:
    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Callable[[str], dict[str, str]], tuple[str]]:
        return _side_effect, (self.name,)


def test_b19_extra_python_objects_need_explicit_opt_in(tmp_path: Path) -> None:
    """B19: a dict with a Python object next to the weights: weights-only load fails, names the
    blocking object and the opt-in, and runs nothing; with trust it runs and loads."""
    MARKER["cfg"] = tmp_path / "ran.txt"
    state = _student_state(0)
    path = _save({"model": state, "config": _TrainConfig("cfg"), "epoch": 2}, tmp_path / "c.pt")

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert f"{_side_effect.__module__}._side_effect" in message
    assert "--trust-checkpoint" in message
    assert not MARKER["cfg"].exists(), "weights-only loading must not run code from the file"

    loaded = load_checkpoint(path, trust=True)
    assert MARKER["cfg"].read_text() == "unpickled"
    assert loaded.metadata["checkpoint_fields"]["epoch"] == 2


def test_b19_reference_script_checkpoint_loads_weights_only(
    tmp_path: Path, resnet18_state: tuple[dict, dict]
) -> None:
    """torchvision's reference train.py stores ``args`` (a Namespace) beside the weights; plain
    data like that, pathlib paths and numpy scalars pass weights-only loading."""
    state, expected = resnet18_state
    args = argparse.Namespace(lr=0.02, epochs=26, output_dir=Path("runs/x"), data_path="/coco")
    path = _save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": []},
            "lr_scheduler": {"milestones": {16: 1}},
            "args": args,
            "epoch": 25,
            "best_map": np.float64(0.31),
            "history": np.zeros(3),
        },
        tmp_path / "ref.pth",
    )

    loaded = load_checkpoint(path, min_size=SIZE, max_size=SIZE)

    assert loaded.metadata["loaded_as"]["trusted"] is False
    assert loaded.metadata["checkpoint_fields"]["epoch"] == 25
    assert loaded.metadata["checkpoint_fields"]["args"]["lr"] == 0.02
    _assert_same_detections(_detect(loaded.model), expected)


def test_torchscript_archive_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))

    with pytest.raises(CheckpointError, match="TorchScript archive.*--trust-checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a Mask R-CNN state_dict"):
        load_checkpoint(path, trust=True)


# -- class names -----------------------------------------------------------------------------------


def _coco_categories(path: Path, cats: list[tuple[int, str]]) -> Path:
    path.write_text(
        json.dumps(
            {"images": [], "annotations": [], "categories": [{"id": c, "name": n} for c, n in cats]}
        )
    )
    return path


@pytest.fixture(scope="module")
def three_class_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """maskedge student weights (4 classes with background), with class names in the dict."""
    path = tmp_path_factory.mktemp("names") / "named.pt"
    torch.manual_seed(0)
    state = build_model(student_spec(num_classes=4, image_size=SIZE)).state_dict()
    torch.save({"model": state, "classes": ["cat", "dog", "bird"]}, path)
    return path


def test_class_names_from_checkpoint(three_class_checkpoint: Path) -> None:
    loaded = load_checkpoint(three_class_checkpoint)
    assert loaded.class_names == ["cat", "dog", "bird"]
    assert loaded.category_ids == [1, 2, 3]
    assert loaded.metadata["loaded_as"]["class_names_from"] == "checkpoint"


@pytest.mark.parametrize(
    ("option", "names"),
    [
        (["__background__", "a", "b", "c"], ["a", "b", "c"]),
        ("a, b ,c", ["a", "b", "c"]),
    ],
)
def test_class_names_option(three_class_checkpoint: Path, option: Any, names: list[str]) -> None:
    loaded = load_checkpoint(three_class_checkpoint, class_names=option)
    assert loaded.class_names == names
    assert loaded.category_ids == [1, 2, 3]


def test_class_names_from_text_file(three_class_checkpoint: Path, tmp_path: Path) -> None:
    names = tmp_path / "classes.txt"
    names.write_text("cat\n\ndog\nbird\n")
    assert load_checkpoint(three_class_checkpoint, class_names=names).class_names == [
        "cat",
        "dog",
        "bird",
    ]


def test_class_names_from_coco_keep_category_ids(
    three_class_checkpoint: Path, tmp_path: Path
) -> None:
    """Predictions must map back to the user's own (sparse) category ids."""
    coco = _coco_categories(tmp_path / "train.json", [(17, "cat"), (3, "dog"), (44, "bird")])
    loaded = load_checkpoint(three_class_checkpoint, class_names=coco)
    assert loaded.class_names == ["dog", "cat", "bird"]
    assert loaded.category_ids == [3, 17, 44]
    assert loaded.label_to_cat == {1: 3, 2: 17, 3: 44}


def test_class_names_from_coco_torchvision_convention(tmp_path: Path) -> None:
    """torchvision's COCO models predict label == category id, with unused ids in between."""
    state = build_model(student_spec(num_classes=6, image_size=SIZE)).state_dict()
    path = _save(state, tmp_path / "w.pt")
    coco = _coco_categories(tmp_path / "val.json", [(1, "person"), (3, "car"), (5, "bus")])

    loaded = load_checkpoint(path, class_names=coco)

    assert loaded.class_names == ["person", "N/A", "car", "N/A", "bus"]
    assert loaded.label_to_cat[3] == 3


def test_class_names_count_mismatch_gives_both_numbers(three_class_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(three_class_checkpoint, class_names=["a", "b"])
    assert "2 class names" in str(err.value) and "predict 3 classes" in str(err.value)


# -- what is not a usable checkpoint ---------------------------------------------------------------


def _faster_rcnn_state(tmp_path: Path) -> Path:
    state = {k: v for k, v in _student_state(0).items() if "mask" not in k}
    return _save(state, tmp_path / "frcnn.pt")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(tmp_path: Path) -> Path:
    full = _save(_student_state(0), tmp_path / "full.pt").read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(full[: len(full) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing.pt", "checkpoint file not found"),
        (lambda p: p, "is a folder"),
        (lambda p: _write(p / "empty.pt", b""), "is empty (0 bytes)"),
        (lambda p: _write(p / "rand.pt", bytes(range(256)) * 8), "not a readable PyTorch"),
        (_truncated, "truncated or damaged"),
        (
            lambda p: _save({"epoch": 3, "optimizer": {}}, p / "noweights.pt"),
            "a dict without model weights",
        ),
        (lambda p: _save({"fc.weight": torch.zeros(2, 2)}, p / "cls.pt"), "not a Mask R-CNN"),
        (_faster_rcnn_state, "Faster R-CNN"),
        (
            lambda p: _write(p / "w.safetensors", b'\x10\0\0\0\0\0\0\0{"a": 1}       '),
            "safetensors",
        ),
        (lambda p: _save([torch.zeros(1)], p / "list.pt"), "holds a list"),
    ],
)
def test_unusable_files_get_one_clear_error(
    tmp_path: Path, make: Callable[[Path], Path], expected: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def _zip_of_other_files(tmp_path: Path) -> Path:
    import zipfile

    path = tmp_path / "weights.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/weights.bin", b"\0" * 64)
    return path


@pytest.mark.parametrize(
    ("make", "what", "todo"),
    [
        (lambda p: _write(p / "empty.pt", b""), "is empty (0 bytes)", "re-save the weights"),
        (
            lambda p: _write(p / "notes.pt", b"epoch 3, mAP 0.41\nsaved to model_3.pth\n"),
            "is a text file (39 bytes, starting 'epoch 3, mAP 0.41')",
            "re-save the weights",
        ),
        (
            lambda p: _write(p / "model.pth", b"<!DOCTYPE html>\n<html><body>403</body></html>"),
            "is a web page",
            "download the checkpoint again",
        ),
        (
            lambda p: _write(
                p / "lfs.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"
            ),
            "is a Git LFS pointer",
            "git lfs pull",
        ),
        (_truncated, "a zip archive (as torch.save writes) that is truncated or damaged", "again"),
        (_zip_of_other_files, "not one torch.save wrote (no data.pkl", "pass the .pt/.pth file"),
        (
            lambda p: _write(p / "legacy.pt", b"\x80\x02}q\x00(X"),
            "not a readable PyTorch checkpoint: truncated or damaged",
            "re-save the weights",
        ),
    ],
)
def test_broken_files_say_what_they_are_and_what_to_do(
    tmp_path: Path, make: Callable[[Path], Path], what: str, todo: str
) -> None:
    """A 0-byte file, a text file saved as ``.pt``, a truncated zip: what it is, what to do.

    Never torch's own advice to retry with ``weights_only=False``.
    """
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert what in message
    assert todo in message
    assert "weights_only" not in message


def test_class_names_fallback_coco_maps_to_its_category_ids(tmp_path: Path) -> None:
    """A checkpoint without names takes them, and the category ids, from the build's COCO file."""
    state = build_model(student_spec(num_classes=4, image_size=SIZE)).state_dict()
    path = _save({"model": state}, tmp_path / "w.pt")
    coco = _coco_categories(tmp_path / "val.json", [(20, "cone"), (3, "disk"), (7, "block")])

    loaded = load_checkpoint(path, class_names_fallback=coco)

    assert loaded.class_names == ["disk", "block", "cone"]
    assert loaded.label_to_cat == {1: 3, 2: 7, 3: 20}
    assert loaded.metadata["loaded_as"]["class_names_from"] == str(coco)
    assert load_checkpoint(path, class_names="a,b,c", class_names_fallback=coco).category_ids == [
        1,
        2,
        3,
    ]


def test_class_names_fallback_never_overrides_the_checkpoint(
    three_class_checkpoint: Path, tmp_path: Path
) -> None:
    coco = _coco_categories(tmp_path / "val.json", [(5, "x"), (6, "y"), (7, "z")])
    loaded = load_checkpoint(three_class_checkpoint, class_names_fallback=coco)
    assert loaded.class_names == ["cat", "dog", "bird"]
    assert loaded.metadata["loaded_as"]["class_names_from"] == "checkpoint"


def test_class_names_fallback_that_does_not_fit_says_what_to_pass(tmp_path: Path) -> None:
    state = build_model(student_spec(num_classes=4, image_size=SIZE)).state_dict()
    path = _save(state, tmp_path / "w.pt")
    coco = _coco_categories(tmp_path / "val.json", [(10, "a"), (11, "b")])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, class_names_fallback=coco)
    message = str(err.value)
    assert "2 categories (ids [10, 11])" in message and "predict 3 classes" in message
    assert "pass --class-names" in message


def test_diverged_weights_are_refused(tmp_path: Path) -> None:
    state = _student_state(0)
    state["roi_heads.box_head.fc6.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf.*fc6"):
        load_checkpoint(_save(state, tmp_path / "nan.pt"))


def test_weights_that_do_not_fit_say_what_is_wrong(tmp_path: Path) -> None:
    state = _student_state(0)
    del state["roi_heads.mask_head.0.0.bias"]
    state["roi_heads.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_save(state, tmp_path / "odd.pt"))
    message = str(err.value)
    assert "missing 1 (e.g. roi_heads.mask_head.0.0.bias)" in message
    assert "unexpected 1 (e.g. roi_heads.extra.weight)" in message


def test_b16_prefixed_weights_still_load_strictly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """B16: stripping ``module.`` is no licence to load loosely: a key missing after the strip
    still stops the load, naming it."""
    state = _student_state(0)
    del state["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    path = _save({"model": {"module." + k: v for k, v in state.items()}}, tmp_path / "ddp.pt")
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint"):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
    assert "stripping the 'module.' prefix" in caplog.text
    assert "missing 1 (e.g. roi_heads.mask_predictor.mask_fcn_logits.bias)" in str(err.value)


def test_loaded_model_is_the_documented_type(three_class_checkpoint: Path) -> None:
    loaded = load_checkpoint(three_class_checkpoint)
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == three_class_checkpoint
    assert loaded.spec is not None and loaded.spec.num_classes == 4
    assert loaded.model.arch_spec == loaded.spec
