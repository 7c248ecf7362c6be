"""Test helper: the three static deployment graphs of a torchvision Mask R-CNN, and real inputs.

Used by the calibration, quantization and latency tests. When :mod:`pipeline.export` is present
its ``export_onnx`` writes the graphs (the project's own exporter); otherwise this module exports
them with the same names and shapes (``torch.onnx.export``, legacy exporter), so the tests of the
quantizer do not depend on the export stage being finished.

Graph inputs for calibration come from the PyTorch model itself: the letterboxed image for the
backbone, and RoIAlign-pooled features of the model's own RPN proposals (box head) and detections
(mask head) - real pooled RoI features, not random tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskedge_runner.preprocess import letterbox

GRAPHS = ("backbone", "box_head", "mask_head")


class _Backbone(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(model.transform.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(model.transform.image_std).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.backbone((image - self.mean) / self.std)
        levels = list(feats.values())
        logits, deltas = self.model.rpn.head(levels)
        return (*levels, *logits, *deltas)


class _BoxHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.roi_heads.box_head
        self.predictor = model.roi_heads.box_predictor

    def forward(self, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.head(rois))


class _MaskHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.roi_heads.mask_head
        self.predictor = model.roi_heads.mask_predictor

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.head(rois))


def export_graphs(model: nn.Module, out_dir: Path, size: int) -> Path:
    """Write ``graph_spec.json`` and ``models/fp32/{backbone,box_head,mask_head}.onnx``."""
    model = model.eval()
    models = Path(out_dir) / "models" / "fp32"
    models.mkdir(parents=True, exist_ok=True)
    c = model.backbone.out_channels
    levels = 4
    names = ([f"feat_{i}" for i in range(3)] + ["feat_pool"]
             + [f"rpn_logits_{i}" for i in range(levels)]
             + [f"rpn_deltas_{i}" for i in range(levels)])
    with torch.no_grad():
        torch.onnx.export(_Backbone(model), (torch.rand(1, 3, size, size),),
                          str(models / "backbone.onnx"), input_names=["image"],
                          output_names=names, opset_version=17, dynamo=False)
        torch.onnx.export(_BoxHead(model), (torch.rand(5, c, 7, 7),),
                          str(models / "box_head.onnx"), input_names=["rois"],
                          output_names=["class_logits", "box_deltas"],
                          dynamic_axes={"rois": {0: "n"}, "class_logits": {0: "n"},
                                        "box_deltas": {0: "n"}},
                          opset_version=17, dynamo=False)
        torch.onnx.export(_MaskHead(model), (torch.rand(3, c, 14, 14),),
                          str(models / "mask_head.onnx"), input_names=["rois"],
                          output_names=["mask_logits"],
                          dynamic_axes={"rois": {0: "n"}, "mask_logits": {0: "n"}},
                          opset_version=17, dynamo=False)
    spec = {"image_size": size, "graphs": {g: f"{g}.onnx" for g in GRAPHS},
            "note": "written by tests/onnx_graphs.py"}
    (Path(out_dir) / "graph_spec.json").write_text(json.dumps(spec, indent=1))
    return Path(out_dir)


def torch_graph_inputs(model: nn.Module, images: list[np.ndarray], size: int
                       ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each graph's inputs as the PyTorch model computes them on ``images`` (uint8 HxWx3)."""
    model = model.eval()
    out: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in GRAPHS}
    with torch.no_grad():
        for image in images:
            x, _ = letterbox(image, size)
            out["backbone"].append({"image": x})
            batch, _ = model.transform([torch.from_numpy(x[0])])
            feats = model.backbone(batch.tensors)
            proposals, _ = model.rpn(batch, feats)
            rois = model.roi_heads.box_roi_pool(feats, proposals, batch.image_sizes)
            out["box_head"].append({"rois": rois.numpy()})
            dets, _ = model.roi_heads(feats, proposals, batch.image_sizes)
            boxes = [d["boxes"] for d in dets]
            if len(boxes[0]):
                pooled = model.roi_heads.mask_roi_pool(feats, boxes, batch.image_sizes)
                out["mask_head"].append({"rois": pooled.numpy()})
    return out
