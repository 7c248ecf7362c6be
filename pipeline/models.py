"""Mask R-CNN architectures maskedge builds: the demo teacher and the edge students.

Every model is an instance of torchvision's ``MaskRCNN`` class; only the backbone, the FPN width,
the head widths and the RoI budgets differ. An :class:`ArchSpec` names all of it, is stored in
every checkpoint maskedge writes and in the bundle manifest, and rebuilds the module exactly.

Edge sizing (measured on the demo, see the manifest): the FPN runs on strides 8, 16 and 32 (plus
a max-pooled stride-64 level for the RPN), which skips the stride-4 level whose 3x3 convolutions
would cost more than a MobileNet backbone; the box head is a 256-wide two-layer MLP; RoI budgets
are sized for images with tens of objects, not hundreds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipeline.errors import ConfigError

BACKBONES = ("resnet18", "resnet34", "mobilenet_v3_large")


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild a maskedge Mask R-CNN, as plain data."""

    backbone: str
    num_classes: int  # including background
    image_size: int = 256
    fpn_channels: int = 128
    representation_size: int = 256
    mask_layers: tuple[int, ...] = (128, 128, 128, 128)
    anchor_sizes: tuple[int, ...] = (24, 48, 96, 192)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_nms_thresh: float = 0.7
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 20
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"unknown backbone {self.backbone!r}; maskedge builds {', '.join(BACKBONES)}"
            )
        if self.num_classes < 2:
            raise ConfigError(f"num_classes={self.num_classes} must count background plus >= 1")
        if self.image_size % 64:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of 64")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        data = dict(data)
        for key in ("mask_layers", "anchor_sizes", "aspect_ratios"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def with_(self, **changes: Any) -> ArchSpec:
        return replace(self, **changes)


def teacher_spec(num_classes: int) -> ArchSpec:
    """The demo teacher: ResNet-18 FPN, 128-wide, full-width heads."""
    return ArchSpec(backbone="resnet18", num_classes=num_classes)


def student_spec(num_classes: int, backbone: str = "mobilenet_v3_large", image_size: int = 256,
                 fpn_channels: int = 128) -> ArchSpec:
    """An edge student: FPN, RPN and box head keep the teacher's widths so they can start from its
    weights; the mask head is narrower and shallower, since it runs once per detection."""
    return ArchSpec(backbone=backbone, num_classes=num_classes, image_size=image_size,
                    fpn_channels=fpn_channels, mask_layers=(64, 64))


def _body(spec: ArchSpec) -> tuple[nn.Module, dict[str, str], list[int]]:
    if spec.backbone in ("resnet18", "resnet34"):
        net = {"resnet18": resnet18, "resnet34": resnet34}[spec.backbone](
            weights=None, norm_layer=nn.BatchNorm2d
        )
        return net, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512]
    features = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d).features
    # the last block of each stride-8/16/32 stage, not the first as torchvision's helper takes
    return features, {"6": "0", "12": "1", "16": "2"}, [40, 112, 960]


def build_model(spec: ArchSpec) -> MaskRCNN:
    """A randomly initialised torchvision ``MaskRCNN`` shaped by ``spec``."""
    body, return_layers, in_channels = _body(spec)
    backbone = BackboneWithFPN(
        body, return_layers, in_channels, spec.fpn_channels, extra_blocks=LastLevelMaxPool()
    )
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in spec.anchor_sizes),
        aspect_ratios=(tuple(spec.aspect_ratios),) * len(spec.anchor_sizes),
    )
    c = spec.fpn_channels
    box_pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=14, sampling_ratio=2)
    mask_head = MaskRCNNHeads(c, list(spec.mask_layers), dilation=1)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=spec.image_size,
        max_size=spec.image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_top_n_test,
        rpn_nms_thresh=spec.rpn_nms_thresh,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(c * 7 * 7, spec.representation_size),
        box_predictor=FastRCNNPredictor(spec.representation_size, spec.num_classes),
        box_score_thresh=spec.box_score_thresh,
        box_nms_thresh=spec.box_nms_thresh,
        box_detections_per_img=spec.box_detections_per_img,
        box_batch_size_per_image=256,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(spec.mask_layers[-1], spec.mask_layers[-1],
                                         spec.num_classes),
    )
    model.arch_spec = spec  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: MaskRCNN, image_size: int, num_rois: int | None = None,
               num_detections: int | None = None) -> dict[str, int]:
    """Multiply-accumulates of one inference at ``image_size``, per deployed part.

    Counted from the Conv2d/ConvTranspose2d/Linear layers actually run (forward hooks), for the
    backbone+FPN+RPN graph at the full input, the box head on ``num_rois`` RoIs and the mask head
    on ``num_detections`` detections (defaults: the model's RoI budgets).
    """
    num_rois = num_rois or model.rpn._post_nms_top_n["testing"]
    num_detections = num_detections or model.roi_heads.detections_per_img
    counts: dict[str, int] = {}

    def hook_for(key: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                macs = output.numel() * module.in_features
            else:
                w = module.weight
                per_out = w.shape[1] * w.shape[2] * w.shape[3]
                if isinstance(module, nn.ConvTranspose2d):
                    per_out = w.shape[0] * w.shape[2] * w.shape[3] // (module.stride[0] ** 2)
                macs = output.numel() * per_out
            counts[key] = counts.get(key, 0) + int(macs)
        return hook

    parts = {
        "backbone_rpn": [model.backbone, model.rpn.head],
        "box_head": [model.roi_heads.box_head, model.roi_heads.box_predictor],
        "mask_head": [model.roi_heads.mask_head, model.roi_heads.mask_predictor],
    }
    handles = []
    for key, modules in parts.items():
        for top in modules:
            for m in top.modules():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    handles.append(m.register_forward_hook(hook_for(key)))
    c = model.backbone.out_channels
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.backbone(torch.zeros(1, 3, image_size, image_size))
            model.rpn.head(list(feats.values()))
            pooled = torch.zeros(num_rois, c, 7, 7)
            model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
            if num_detections:
                pooled = torch.zeros(num_detections, c, 14, 14)
                model.roi_heads.mask_predictor(model.roi_heads.mask_head(pooled))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    counts["total"] = sum(counts.values())
    return counts
