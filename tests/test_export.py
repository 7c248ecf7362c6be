"""pipeline.export: three static ONNX graphs and a graph spec read off the model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.errors import ConversionError
from pipeline.export import BackboneGraph, BoxHeadGraph, MaskHeadGraph, export_graphs
from pipeline.models import build_model, student_spec

# ops that would make a graph data-dependent; the deployment graphs must have none
DYNAMIC_OPS = {"If", "Loop", "NonZero", "TopK", "ScatterElements", "NonMaxSuppression", "RoiAlign"}


@pytest.fixture(scope="module")
def teacher_export(demo_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_export")
    return demo_teacher.model, export_graphs(demo_teacher.model, out)


@pytest.fixture(scope="module")
def student_export(tiny_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("student_export")
    return tiny_student, export_graphs(tiny_student, out)


@pytest.fixture(params=["teacher", "student"])
def exported(request, teacher_export, student_export):
    return teacher_export if request.param == "teacher" else student_export


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_layout_and_spec_file(exported):
    model, result = exported
    assert _files(result.out_dir) == [
        "graph_spec.json",
        "models/fp32/backbone.onnx",
        "models/fp32/box_head.onnx",
        "models/fp32/mask_head.onnx",
    ]
    assert result.graphs == {
        name: result.out_dir / "models" / "fp32" / f"{name}.onnx"
        for name in ("backbone", "box_head", "mask_head")
    }
    assert json.loads(result.spec_path.read_text()) == result.graph_spec
    assert result.exporter == "legacy" and result.graph_spec["exporter"] == "legacy"
    assert result.graph_spec["opset"] == 17
    assert result.graph_spec["versions"]["torch"] == torch.__version__


def test_spec_is_read_off_the_model(exported):
    model, result = exported
    spec = result.graph_spec
    size = model.transform.min_size[0]
    assert spec["input"]["size"] == size
    assert spec["input"]["mean"] == pytest.approx(model.transform.image_mean)
    assert spec["input"]["std"] == pytest.approx(model.transform.image_std)
    assert spec["num_classes"] == model.roi_heads.box_predictor.cls_score.out_features
    assert spec["fpn"]["levels"] == ["0", "1", "2", "pool"]
    assert spec["fpn"]["strides"] == [8, 16, 32, 64]
    assert spec["fpn"]["grids"] == [[size // s, size // s] for s in (8, 16, 32, 64)]
    assert spec["fpn"]["channels"] == model.backbone.out_channels
    gen = model.rpn.anchor_generator
    assert spec["anchors"]["sizes"] == [list(s) for s in gen.sizes]
    assert spec["anchors"]["aspect_ratios"] == [list(a) for a in gen.aspect_ratios]
    for cells, ref in zip(spec["anchors"]["cell_anchors"], gen.cell_anchors, strict=True):
        np.testing.assert_array_equal(np.asarray(cells, np.float32), ref.numpy())
    rpn = spec["rpn"]
    assert rpn["pre_nms_top_n"] == model.rpn._pre_nms_top_n["testing"]
    assert rpn["post_nms_top_n"] == model.rpn._post_nms_top_n["testing"]
    assert (rpn["nms_thresh"], rpn["score_thresh"], rpn["min_size"]) == (
        model.rpn.nms_thresh,
        model.rpn.score_thresh,
        model.rpn.min_size,
    )
    assert rpn["box_coder_weights"] == [1.0, 1.0, 1.0, 1.0]
    heads = spec["roi_heads"]
    assert heads["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert heads["score_thresh"] == model.roi_heads.score_thresh
    assert heads["nms_thresh"] == model.roi_heads.nms_thresh
    assert heads["detections_per_img"] == model.roi_heads.detections_per_img
    for key, pool, out in (
        ("box_roi_pool", model.roi_heads.box_roi_pool, 7),
        ("mask_roi_pool", model.roi_heads.mask_roi_pool, 14),
    ):
        assert spec[key]["featmap_names"] == ["0", "1", "2"]
        assert spec[key]["output_size"] == [out, out]
        assert spec[key]["sampling_ratio"] == pool.sampling_ratio
        assert spec[key]["scales"] == [1 / 8, 1 / 16, 1 / 32]
        assert (spec[key]["k_min"], spec[key]["k_max"]) == (3, 5)
        assert spec[key]["canonical_scale"] == 224 and spec[key]["canonical_level"] == 4
    assert spec["mask"] == {"resolution": 28, "paste_padding": 1}


def test_spec_follows_a_changed_architecture(tmp_path):
    spec = student_spec(num_classes=3, image_size=192).with_(
        anchor_sizes=(16, 40, 80, 160),
        aspect_ratios=(0.5, 1.0),
        rpn_pre_nms_top_n_test=120,
        rpn_post_nms_top_n_test=37,
        box_detections_per_img=9,
        box_score_thresh=0.2,
    )
    torch.manual_seed(1)
    model = build_model(spec).eval()
    result = export_graphs(model, tmp_path, opset=13, verify=False)
    got = result.graph_spec
    assert got["input"]["size"] == 192
    assert got["num_classes"] == 3
    assert got["fpn"]["grids"] == [[24, 24], [12, 12], [6, 6], [3, 3]]
    assert got["anchors"]["sizes"] == [[16], [40], [80], [160]]
    assert got["anchors"]["per_location"] == [2, 2, 2, 2]
    assert (got["rpn"]["pre_nms_top_n"], got["rpn"]["post_nms_top_n"]) == (120, 37)
    assert got["roi_heads"]["detections_per_img"] == 9
    assert got["roi_heads"]["score_thresh"] == pytest.approx(0.2)
    assert got["opset"] == 13
    assert onnx.load(str(result.graphs["box_head"])).opset_import[0].version == 13
    assert got["graphs"]["box_head"]["outputs"] == [
        {"name": "class_logits", "shape": ["N", 3], "dtype": "float32"},
        {"name": "box_deltas", "shape": ["N", 12], "dtype": "float32"},
    ]
    assert "export_check" not in got


def test_graphs_are_static_with_named_io(exported):
    model, result = exported
    spec = result.graph_spec
    c = model.backbone.out_channels
    k = spec["num_classes"]
    expected_io = {
        "backbone": (["image"], [o["name"] for o in spec["graphs"]["backbone"]["outputs"]]),
        "box_head": (["rois"], ["class_logits", "box_deltas"]),
        "mask_head": (["rois"], ["mask_logits"]),
    }
    assert expected_io["backbone"][1] == (
        ["feat_0", "feat_1", "feat_2", "feat_pool"]
        + [f"rpn_logits_{i}" for i in range(4)]
        + [f"rpn_deltas_{i}" for i in range(4)]
    )
    for name, (inputs, outputs) in expected_io.items():
        proto = onnx.load(str(result.graphs[name]))
        onnx.checker.check_model(proto)
        assert [i.name for i in proto.graph.input] == inputs
        assert [o.name for o in proto.graph.output] == outputs
        ops = {node.op_type for node in proto.graph.node}
        assert not ops & DYNAMIC_OPS, f"{name} has data-dependent ops {ops & DYNAMIC_OPS}"
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        first = dims[0].dim_param or dims[0].dim_value
        assert first == ("N" if name != "backbone" else 1)
    box_in = spec["graphs"]["box_head"]["inputs"][0]
    assert box_in["shape"] == ["N", c, 7, 7]
    assert spec["graphs"]["mask_head"]["inputs"][0]["shape"] == ["N", c, 14, 14]
    assert spec["graphs"]["mask_head"]["outputs"][0]["shape"] == ["N", k, 28, 28]
    a = spec["anchors"]["per_location"][0]
    size = spec["input"]["size"]
    outs = {o["name"]: o["shape"] for o in spec["graphs"]["backbone"]["outputs"]}
    assert outs["rpn_logits_0"] == [1, a, size // 8, size // 8]
    assert outs["rpn_deltas_3"] == [1, 4 * a, size // 64, size // 64]
    assert outs["feat_pool"] == [1, c, size // 64, size // 64]


@pytest.mark.parametrize("n", [1, 29])
def test_ort_graphs_match_torch(exported, n):
    model, result = exported
    gen = torch.Generator().manual_seed(n)
    c = model.backbone.out_channels
    size = result.graph_spec["input"]["size"]
    cases = {
        "backbone": (BackboneGraph(model), torch.rand(1, 3, size, size, generator=gen), "image"),
        "box_head": (BoxHeadGraph(model), torch.randn(n, c, 7, 7, generator=gen), "rois"),
        "mask_head": (MaskHeadGraph(model), torch.randn(n, c, 14, 14, generator=gen), "rois"),
    }
    for name, (module, x, input_name) in cases.items():
        session = ort.InferenceSession(str(result.graphs[name]), providers=["CPUExecutionProvider"])
        got = session.run(None, {input_name: x.numpy()})
        with torch.no_grad():
            ref = module.eval()(x)
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            r = r.numpy()
            assert g.shape == r.shape
            scale = max(1.0, float(np.abs(r).max()))
            assert np.abs(g - r).max() <= 2e-5 * scale, name
    assert set(result.max_abs_diff) == {"backbone", "box_head", "mask_head"}
    assert max(result.max_abs_diff.values()) < 1e-3


def test_export_rejects_bad_input(tmp_path, tiny_student):
    with pytest.raises(ConversionError, match="exporter='torchscript'"):
        export_graphs(tiny_student, tmp_path, exporter="torchscript")
    with pytest.raises(ConversionError, match="opset=9"):
        export_graphs(tiny_student, tmp_path, opset=9)
    with pytest.raises(ConversionError, match="takes a torchvision MaskRCNN, got Linear"):
        export_graphs(torch.nn.Linear(2, 2), tmp_path)
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# B06: the dynamo exporter, refused or replaced, never leaves a file behind


def _fail_dynamo(monkeypatch: pytest.MonkeyPatch) -> list[bool | None]:
    """Make torch's dynamo exporter write half a file and then fail, as it does on detectors."""
    real_export = torch.onnx.export
    calls = []

    def export(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("dynamo"))
        if kwargs.get("dynamo"):
            Path(args[2]).write_bytes(b"\x08\x07half-written")
            raise RuntimeError("Failed to export the model with torch.export")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


def test_dynamo_refused_leaves_no_file(tmp_path, tiny_student, monkeypatch):
    calls = _fail_dynamo(monkeypatch)
    tiny_student.train()
    try:
        with pytest.raises(ConversionError) as info:
            export_graphs(tiny_student, tmp_path, exporter="dynamo", fallback=False)
        assert tiny_student.training  # the model's mode is restored after a failure
    finally:
        tiny_student.eval()
    message = str(info.value)
    assert "dynamo exporter failed on the backbone graph" in message
    assert "exporter='legacy'" in message
    assert calls == [True]
    assert _files(tmp_path) == []


def test_dynamo_falls_back_to_legacy(tmp_path, tiny_student, monkeypatch, caplog):
    calls = _fail_dynamo(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.export"):
        result = export_graphs(tiny_student, tmp_path, exporter="dynamo", verify=False)
    assert calls == [True, False] * 3
    assert result.exporter == "legacy"
    assert result.graph_spec["exporter"] == "legacy"
    assert sum("dynamo exporter failed" in r.getMessage() for r in caplog.records) == 3
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
    for path in result.graphs.values():
        onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxscript") is not None,
    reason="onnxscript is installed, so torch's dynamo exporter may succeed on static graphs",
)
def test_real_dynamo_exporter_refused_cleanly(tmp_path, tiny_student):
    with pytest.raises(ConversionError, match="the dynamo exporter failed"):
        export_graphs(tiny_student, tmp_path, exporter="dynamo", fallback=False)
    assert _files(tmp_path) == []


def test_failed_check_replaces_nothing(tmp_path, tiny_student, monkeypatch):
    first = export_graphs(tiny_student, tmp_path, verify=False)
    before = {p: p.read_bytes() for p in [first.spec_path, *first.graphs.values()]}
    real_check = onnx.checker.check_model

    def check(proto: onnx.ModelProto, *args: Any, **kwargs: Any) -> None:
        if [o.name for o in proto.graph.output] == ["mask_logits"]:
            raise onnx.checker.ValidationError("Field 'shape' of 'type' is required")
        return real_check(proto, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", check)
    with pytest.raises(ConversionError, match="legacy exporter failed on the mask_head graph"):
        export_graphs(tiny_student, tmp_path, opset=13, verify=False)
    assert {p: p.read_bytes() for p in before} == before  # nothing replaced, opset still 17
    assert _files(tmp_path) == _files(first.out_dir)
