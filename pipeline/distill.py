"""The distill stage: train the edge student from the teacher.

The student is ``build_model(student_spec)`` (a torchvision ``MaskRCNN``, MobileNetV3-Large FPN by
default). It learns from four signals, each switchable and weighted in :class:`DistillSettings`:

- *parameter distillation*: every student module whose parameters and buffers all have a
  namesake of the same shape in the teacher is copied from it before training (with the demo
  architectures: the FPN output convs, the RPN head, the box head and the box predictor, about
  40 % of the student's weights; the MobileNet body, the FPN lateral convs and the narrower mask
  head start fresh), and can be held fixed for the first ``freeze_heads_steps`` steps;
- *detection losses* (torchvision's own RPN, box and mask losses) on teacher pseudo-labels
  (teacher detections scoring at least ``pseudo_label_threshold``, masks pasted and thresholded at
  0.5) and, when ``train`` is a COCO set, on its ground truth (``label_merge``: ``"union"`` adds
  the pseudo-labels that overlap no ground-truth box at IoU >= 0.5; ``"gt_first"`` uses ground
  truth alone wherever an image is annotated);
- *FPN feature imitation*: MSE between student and teacher FPN levels ``0, 1, 2, pool``, averaged
  over the cells whose centre lies inside a target box, plus ``feature_global_weight`` times the
  MSE over the whole map, divided by the teacher's mean square per level so that the weight does
  not depend on the teacher's feature scale (a learned 1x1 adapter maps the student's width to
  the teacher's when they differ; it is not part of the student). With equal widths the
  student's features are pulled toward the teacher's own, which is what its copied heads expect;
- *RoI class-logit distillation*: both box heads run on the teacher's RPN proposals, each pooling
  from its own features; the loss is ``T^2 * KL(teacher || student)`` of the class softmax at
  temperature ``T``.

Both models see the same batch, resized and normalised by the student's transform (so the teacher
runs at the student's input size), horizontally flipped at random as in :mod:`pipeline.train`.
The teacher is only read: eval mode and ``no_grad``; its mode and device are restored afterwards.

Reads: the teacher module, the training images (a ``CocoInstances`` set, or image files for
pseudo-label-only distillation). Writes: ``<workdir>/last.pt`` every ``checkpoint_every`` steps
and at the end (atomically; student, adapter, optimizer and RNG state, loss history). Called again
with the same workdir, teacher, images and settings, ``distill`` resumes from that file to the
same weights as an uninterrupted run (on CPU), and a finished run is returned without training.

Known limits:
- ground-truth labels are taken to follow the teacher's class order (the set's sorted category
  ids, as :mod:`pipeline.checkpoint` and :mod:`pipeline.train` number them); only the number of
  classes is checked;
- pseudo-labels come from one teacher pass on the flipped-or-not image, without test-time
  augmentation; a teacher's misses are the student's misses in pseudo-label-only mode;
- training resizes with torchvision's transform (longer side to the student's size, padding to a
  multiple of 32), while deployment letterboxes to a square; the two agree for square images;
- the default budget (:class:`DistillSettings`) is sized for a build on two CPU cores, not for
  parity: the student ends well below the teacher's AP (the build's report gives both); raise
  ``steps`` when the student is meant for deployment;
- the feature MSE in the report is measured in eval mode on the first 8 training images; early in
  a run it lags the training loss because BatchNorm running statistics trail the weights;
- on CUDA (mixed precision) a resumed run is close to, not bit-identical with, an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou

from maskedge_runner.preprocess import ImageReadError, load_image
from pipeline.datasets import CocoInstances, list_images
from pipeline.errors import ConfigError, DatasetError
from pipeline.models import ArchSpec, build_model, count_macs, count_parameters
from pipeline.progress import step_progress
from pipeline.train import (
    TrainSettings,
    _save_atomic,
    batch_indices,
    load_batch,
    lr_factor,
    pick_device,
)

log = logging.getLogger(__name__)

LABEL_MERGES = ("union", "gt_first", "gt_only")
DETECTION_TERMS = (
    "loss_objectness",
    "loss_rpn_box_reg",
    "loss_classifier",
    "loss_box_reg",
    "loss_mask",
)
CHECKPOINT_FORMAT = "maskedge-distill-state"


@dataclass(frozen=True)
class DistillSettings:
    """How the student is distilled. The defaults are ``invoke build``'s budget on the demo."""

    steps: int = 600
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    checkpoint_every: int = 50
    seed: int = 0
    detection_weight: float = 1.0
    feature_weight: float = 1.0
    feature_global_weight: float = 0.1
    logit_weight: float = 1.0
    temperature: float = 2.0
    channel_weight: float = 0.0
    channel_temperature: float = 4.0
    box_weight: float = 0.0
    mask_weight: float = 0.0
    pseudo_label_threshold: float = 0.5
    use_gt: bool = True
    label_merge: str = "union"
    init_from_teacher: bool = True
    freeze_heads_steps: int = 0
    grad_clip: float = 10.0

    @property
    def uses_teacher(self) -> bool:
        """Whether any signal comes from the teacher (False for the ground-truth-only baseline)."""
        return (
            self.init_from_teacher
            or self.label_merge != "gt_only"
            or not self.use_gt
            or any(w > 0 for w in (self.feature_weight, self.logit_weight,
                                   self.channel_weight, self.box_weight, self.mask_weight))
        )

    def cache_key(self) -> dict[str, Any]:
        """The settings as a cache key: a method that is switched off is left out.

        A switched-off term cannot change the student, so leaving it out keeps students distilled
        before the term existed valid in the cache.
        """
        key = asdict(self)
        for name in ("channel_weight", "box_weight", "mask_weight"):
            if key[name] == 0:
                del key[name]
        if "channel_weight" not in key:
            del key["channel_temperature"]
        return key

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ConfigError(
                f"steps={self.steps}, batch_size={self.batch_size} and "
                f"checkpoint_every={self.checkpoint_every} must each be >= 1"
            )
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError(
                f"lr={self.lr} must be > 0, weight_decay={self.weight_decay} and "
                f"warmup_steps={self.warmup_steps} >= 0"
            )
        weights = {
            "detection_weight": self.detection_weight,
            "feature_weight": self.feature_weight,
            "feature_global_weight": self.feature_global_weight,
            "logit_weight": self.logit_weight,
            "channel_weight": self.channel_weight,
            "box_weight": self.box_weight,
            "mask_weight": self.mask_weight,
        }
        negative = {k: v for k, v in weights.items() if not v >= 0}
        if negative:
            raise ConfigError(f"loss weights must be >= 0; got {negative}")
        if sum(weights.values()) - self.feature_global_weight <= 0:
            raise ConfigError(
                f"the loss weights are all 0 ({weights}); switch on at least one training signal"
            )
        if self.temperature <= 0 or self.channel_temperature <= 0:
            raise ConfigError(
                f"temperature={self.temperature} and channel_temperature="
                f"{self.channel_temperature} must be > 0 (1-4 is usual)"
            )
        if not 0.0 < self.pseudo_label_threshold <= 1.0:
            raise ConfigError(
                f"pseudo_label_threshold={self.pseudo_label_threshold} must be in (0, 1]"
            )
        if self.label_merge not in LABEL_MERGES:
            raise ConfigError(f"label_merge={self.label_merge!r}; choose one of {LABEL_MERGES}")
        if self.label_merge == "gt_only" and not self.use_gt:
            raise ConfigError("label_merge='gt_only' with use_gt=False leaves no labels at all")
        if self.freeze_heads_steps < 0 or self.grad_clip <= 0:
            raise ConfigError(
                f"freeze_heads_steps={self.freeze_heads_steps} must be >= 0 and "
                f"grad_clip={self.grad_clip} > 0"
            )

    def schedule(self) -> TrainSettings:
        """The learning-rate schedule of :func:`pipeline.train.lr_factor` for these settings."""
        return TrainSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
        )


def baseline_settings(settings: DistillSettings) -> DistillSettings:
    """The ground-truth-only student with ``settings``' step budget and schedule: no teacher.

    Same steps, batch, learning rate, warm-up and seed; detection losses on ground truth alone, no
    parameter copying and every distillation term off. It is the reference the distilled
    student is measured against (:func:`gap_closed`).
    """
    return replace(
        settings,
        detection_weight=1.0,
        feature_weight=0.0,
        logit_weight=0.0,
        channel_weight=0.0,
        box_weight=0.0,
        mask_weight=0.0,
        use_gt=True,
        label_merge="gt_only",
        init_from_teacher=False,
        freeze_heads_steps=0,
    )


def gap_closed(teacher: float, baseline: float, distilled: float) -> float | None:
    """The fraction of the teacher-baseline gap the distilled student closed (None: no gap)."""
    gap = teacher - baseline
    if gap <= 1e-9:
        return None
    return (distilled - baseline) / gap


class ImageFiles:
    """Unlabelled image files behind the reading interface of :class:`CocoInstances`.

    ``target`` returns no objects, so only teacher pseudo-labels train the detector.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.image_ids = list(range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, image_id: int) -> np.ndarray:
        try:
            return load_image(self.paths[image_id])
        except ImageReadError as err:
            raise DatasetError(str(err)) from err

    def target(self, image_id: int) -> dict[str, np.ndarray]:
        with Image.open(self.paths[image_id]) as im:
            w, h = im.size
        return {
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros((0,), np.int64),
            "masks": np.zeros((0, h, w), np.uint8),
        }


@dataclass
class _Run:
    """Everything one distillation step touches."""

    teacher: MaskRCNN
    student: MaskRCNN
    adapter: nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: CocoInstances | ImageFiles
    settings: DistillSettings
    device: torch.device
    copied: list[str]
    frozen: list[nn.Parameter] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    feature_mse_before: float | None = None


def copy_matching_parameters(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Copy the student's modules whose every parameter and buffer matches the teacher's.

    A module (a state_dict key prefix up to its last dot) is copied whole when each of its tensors
    has a namesake of the same shape in the teacher, and left alone otherwise, so no layer ends up
    with the teacher's bias on a fresh weight. Returns the names copied, in state_dict order.
    """
    source = teacher.state_dict()
    target = student.state_dict()
    modules: dict[str, list[str]] = {}
    for key in target:
        modules.setdefault(key.rsplit(".", 1)[0], []).append(key)
    whole = {
        prefix
        for prefix, keys in modules.items()
        if all(k in source and source[k].shape == target[k].shape for k in keys)
    }
    copied = [k for k in target if k.rsplit(".", 1)[0] in whole]
    with torch.no_grad():
        for k in copied:
            target[k].copy_(source[k].to(target[k].dtype))
    return copied


def pseudo_labels(
    detections: list[dict[str, torch.Tensor]], image_sizes: list[tuple[int, int]], threshold: float
) -> list[dict[str, torch.Tensor]]:
    """Teacher detections (eval-mode ``roi_heads`` output) -> training targets.

    Keeps detections scoring at least ``threshold`` whose box is at least 1 px wide and high and
    whose mask, pasted into the image and thresholded at 0.5, is not empty.
    """
    out = []
    for det, (h, w) in zip(detections, image_sizes, strict=True):
        boxes = det["boxes"].float()
        keep = (
            (det["scores"] >= threshold)
            & (boxes[:, 2] - boxes[:, 0] >= 1)
            & (boxes[:, 3] - boxes[:, 1] >= 1)
        )
        boxes, labels = boxes[keep], det["labels"][keep]
        masks = paste_masks_in_image(det["masks"][keep].float(), boxes, (h, w))[:, 0] > 0.5
        nonempty = masks.flatten(1).any(dim=1)
        out.append(
            {
                "boxes": boxes[nonempty],
                "labels": labels[nonempty].to(torch.int64),
                "masks": masks[nonempty].to(torch.uint8),
            }
        )
    return out


def merge_targets(
    gt: list[dict[str, torch.Tensor]], pseudo: list[dict[str, torch.Tensor]], mode: str
) -> list[dict[str, torch.Tensor]]:
    """Ground truth and pseudo-labels -> one target per image.

    ``union``: ground truth plus the pseudo-labels that overlap no ground-truth box at IoU >= 0.5.
    ``gt_first``: ground truth where an image has any, pseudo-labels otherwise.
    ``gt_only``: ground truth alone (the baseline without a teacher).
    """
    if mode == "gt_only":
        return gt
    out = []
    for g, p in zip(gt, pseudo, strict=True):
        if len(g["boxes"]) == 0:
            out.append(p)
            continue
        if mode == "gt_first" or len(p["boxes"]) == 0:
            out.append(g)
            continue
        new = box_iou(p["boxes"], g["boxes"].float()).max(dim=1).values < 0.5
        out.append(
            {
                "boxes": torch.cat([g["boxes"].float(), p["boxes"][new]]),
                "labels": torch.cat([g["labels"], p["labels"][new]]),
                "masks": torch.cat([g["masks"].to(torch.uint8), p["masks"][new]]),
            }
        )
    return out


def object_mask(
    boxes: list[torch.Tensor], feature_hw: tuple[int, int], input_hw: tuple[int, int]
) -> torch.Tensor:
    """(B, h, w) float mask of the feature cells whose centre lies inside any of the boxes."""
    h, w = feature_hw
    sy, sx = input_hw[0] / h, input_hw[1] / w
    device = boxes[0].device if boxes else torch.device("cpu")
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * sy
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * sx
    masks = []
    for b in boxes:
        if len(b) == 0:
            masks.append(torch.zeros(h, w, device=device))
            continue
        b = b.float()
        inside_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] <= b[:, 3:4])  # (N, h)
        inside_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] <= b[:, 2:3])  # (N, w)
        masks.append((inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0).float())
    return torch.stack(masks)


def match_levels(
    student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor]
) -> list[tuple[str, str]]:
    """Pairs ``(student level, teacher level)`` of FPN maps at the same stride.

    Levels are matched by their spatial size on the same batch, so a teacher with other level
    names or extra levels (torchvision's ResNet-50 FPN adds a stride-4 level ``"0"``) pairs each
    student level with the teacher level at its stride. Student levels without a counterpart are
    left out; no pair at all is a :class:`ConfigError`.
    """
    by_size: dict[tuple[int, int], str] = {}
    for name, t in teacher_features.items():
        by_size.setdefault((int(t.shape[-2]), int(t.shape[-1])), name)
    pairs = []
    for name, f in student_features.items():
        size = (int(f.shape[-2]), int(f.shape[-1]))
        same_name = teacher_features.get(name)
        if same_name is not None and tuple(same_name.shape[-2:]) == size:
            pairs.append((name, name))  # a namesake at the same stride wins a size tie
        elif size in by_size:
            pairs.append((name, by_size[size]))
    if not pairs:
        sizes = {k: tuple(v.shape[-2:]) for k, v in student_features.items()}
        t_sizes = {k: tuple(v.shape[-2:]) for k, v in teacher_features.items()}
        raise ConfigError(
            f"the student's FPN levels {sizes} share no stride with the teacher's {t_sizes}; "
            "feature distillation needs at least one common stride (set feature_weight=0 and "
            "channel_weight=0 to distill without it)"
        )
    return pairs


def feature_imitation_loss(
    student_features: dict[str, torch.Tensor],
    teacher_features: dict[str, torch.Tensor],
    boxes: list[torch.Tensor],
    input_hw: tuple[int, int],
    global_weight: float,
    adapter: nn.Module | None = None,
) -> torch.Tensor:
    """Object-weighted, scale-free MSE between FPN levels at the same stride, averaged.

    Per matched level pair (:func:`match_levels`): the channel-mean squared error averaged over
    the cells inside target boxes (zero when a batch has none), plus ``global_weight`` times the
    mean over all cells, both divided by the teacher's mean squared activation on that level, so
    that a student predicting zeros scores about ``1 + global_weight`` whatever the teacher's
    feature scale.
    """
    terms = []
    for s_level, t_level in match_levels(student_features, teacher_features):
        s = student_features[s_level].float()
        if adapter is not None:
            s = adapter(s)
        t = teacher_features[t_level].float()
        err = (s - t).pow(2).mean(dim=1) / t.pow(2).mean().clamp(min=1e-6)  # (B, h, w)
        weight = object_mask(boxes, (err.shape[1], err.shape[2]), input_hw)
        local = (err * weight).sum() / weight.sum().clamp(min=1.0)
        terms.append(local + global_weight * err.mean())
    return torch.stack(terms).mean()


def channel_wise_loss(
    student_features: dict[str, torch.Tensor],
    teacher_features: dict[str, torch.Tensor],
    temperature: float,
    adapter: nn.Module | None = None,
) -> torch.Tensor:
    """Channel-wise distillation: per channel, KL between spatial softmaxes, averaged over levels.

    Each channel of a matched level pair is turned into a distribution over locations by a
    softmax at temperature ``T``; the loss is ``T^2 * KL(teacher || student)`` summed over the
    locations and averaged over channels and images, so the student learns where each of the
    teacher's channels fires most rather than its absolute values (Shu et al., ICCV 2021).
    """
    terms = []
    for s_level, t_level in match_levels(student_features, teacher_features):
        s = student_features[s_level].float()
        if adapter is not None:
            s = adapter(s)
        t = teacher_features[t_level].float()
        s_log = F.log_softmax(s.flatten(2) / temperature, dim=2)
        t_prob = F.softmax(t.flatten(2) / temperature, dim=2)
        kl = (t_prob * (torch.log(t_prob.clamp(min=1e-12)) - s_log)).sum(dim=2)  # (B, C)
        terms.append(kl.mean() * temperature * temperature)
    return torch.stack(terms).mean()


def roi_distill_losses(
    teacher: MaskRCNN,
    student: MaskRCNN,
    teacher_features: dict[str, torch.Tensor],
    student_features: dict[str, torch.Tensor],
    proposals: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Class-logit and box-regression distillation on the teacher's proposals.

    Both box heads run on the same proposals, each pooling from its own features.
    ``logit_kl``: ``T^2 * KL(teacher || student)`` of the class softmax per RoI. ``box_kd``:
    smooth-L1 between the two heads' regression deltas for the teacher's most likely foreground
    class, weighted by the teacher's probability of that class, so background RoIs count little.
    """
    with torch.no_grad():
        t_rois = teacher.roi_heads.box_roi_pool(teacher_features, proposals, image_sizes)
        t_logits, t_deltas = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(t_rois))
    s_rois = student.roi_heads.box_roi_pool(student_features, proposals, image_sizes)
    s_logits, s_deltas = student.roi_heads.box_predictor(student.roi_heads.box_head(s_rois))
    n = s_logits.shape[0]
    if n == 0:
        zero = s_logits.sum() * 0.0
        return {"logit_kl": zero, "box_kd": zero}
    t = temperature
    logit_kl = F.kl_div(
        F.log_softmax(s_logits.float() / t, dim=1),
        F.softmax(t_logits.float() / t, dim=1),
        reduction="batchmean",
    ) * (t * t)
    fg_prob, fg_class = F.softmax(t_logits.float(), dim=1)[:, 1:].max(dim=1)
    rows = torch.arange(n, device=s_logits.device)
    s_d = s_deltas.float().reshape(n, -1, 4)[rows, fg_class + 1]
    t_d = t_deltas.float().reshape(n, -1, 4)[rows, fg_class + 1]
    per_roi = F.smooth_l1_loss(s_d, t_d, beta=1.0 / 9, reduction="none").sum(dim=1)
    box_kd = (per_roi * fg_prob).sum() / fg_prob.sum().clamp(min=1e-6)
    return {"logit_kl": logit_kl, "box_kd": box_kd}


def mask_distill_loss(
    student: MaskRCNN,
    student_features: dict[str, torch.Tensor],
    teacher_detections: list[dict[str, torch.Tensor]],
    image_sizes: list[tuple[int, int]],
    min_score: float = 0.05,
    per_image: int = 32,
) -> torch.Tensor:
    """Mask-logit distillation: per-pixel BCE of the student's mask logits on the teacher's boxes.

    For each image the teacher's ``per_image`` best detections scoring at least ``min_score``
    are pooled from the student's features; the student's mask logit of the teacher's class is
    trained toward the teacher's mask probability (its own 28x28 output, resized if the heads'
    resolutions differ), weighted by the detection's score.
    """
    boxes, labels, probs, scores = [], [], [], []
    for det in teacher_detections:
        keep = torch.nonzero(det["scores"] >= min_score).flatten()[:per_image]
        boxes.append(det["boxes"][keep].float())
        labels.append(det["labels"][keep])
        probs.append(det["masks"][keep, 0].float())
        scores.append(det["scores"][keep].float())
    if sum(len(b) for b in boxes) == 0:
        return next(iter(student_features.values())).sum() * 0.0
    roi_heads = student.roi_heads
    pooled = roi_heads.mask_roi_pool(student_features, boxes, image_sizes)
    logits = roi_heads.mask_predictor(roi_heads.mask_head(pooled))  # (N, C, m, m)
    label = torch.cat(labels)
    logits = logits[torch.arange(len(label), device=logits.device), label].float()
    target = torch.cat(probs)
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target[:, None], size=logits.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0]
    weight = torch.cat(scores)
    per_mask = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2))
    return (per_mask * weight).sum() / weight.sum().clamp(min=1e-6)


def _prepare_batch(run: _Run, step: int) -> tuple[ImageList, list[dict[str, torch.Tensor]]]:
    s = run.settings
    idx = batch_indices(step, len(run.data), s.batch_size, s.seed)
    images, targets = load_batch(cast(CocoInstances, run.data), idx, step, s.seed, run.device)
    if not s.use_gt:
        targets = [{k: v[:0] for k, v in t.items()} for t in targets]
    batch, resized = run.student.transform(images, targets)
    assert resized is not None
    return batch, resized


def _distill_step(run: _Run, step: int) -> dict[str, float]:
    """One optimisation step; returns the loss terms and the pseudo-labels per image."""
    s, device = run.settings, run.device
    for group in run.optimizer.param_groups:
        group["lr"] = s.lr * lr_factor(step, s.schedule())
    batch, gt = _prepare_batch(run, step)
    amp = device.type == "cuda"
    input_hw = (int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1]))
    pseudo: list[dict[str, torch.Tensor]] = []
    if s.uses_teacher:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            t_feats = run.teacher.backbone(batch.tensors)
            t_props, _ = run.teacher.rpn(batch, t_feats)
            t_dets, _ = run.teacher.roi_heads(t_feats, t_props, batch.image_sizes)
        if s.label_merge != "gt_only":
            pseudo = pseudo_labels(t_dets, batch.image_sizes, s.pseudo_label_threshold)
    targets = merge_targets(gt, pseudo, s.label_merge)
    with torch.autocast(device.type, enabled=amp):
        s_feats = run.student.backbone(batch.tensors)
        terms: dict[str, torch.Tensor] = {}
        if s.detection_weight > 0:
            props, rpn_losses = run.student.rpn(batch, s_feats, targets)
            _, roi_losses = run.student.roi_heads(s_feats, props, batch.image_sizes, targets)
            terms.update({k: v.float() for k, v in {**rpn_losses, **roi_losses}.items()})
        if s.feature_weight > 0:
            terms["feature"] = feature_imitation_loss(
                s_feats,
                t_feats,
                [t["boxes"] for t in targets],
                input_hw,
                s.feature_global_weight,
                run.adapter,
            )
        if s.channel_weight > 0:
            terms["channel"] = channel_wise_loss(
                s_feats, t_feats, s.channel_temperature, run.adapter
            )
        if s.logit_weight > 0 or s.box_weight > 0:
            roi = roi_distill_losses(
                run.teacher,
                run.student,
                t_feats,
                s_feats,
                t_props,
                batch.image_sizes,
                s.temperature,
            )
            if s.logit_weight > 0:
                terms["logit_kl"] = roi["logit_kl"]
            if s.box_weight > 0:
                terms["box_kd"] = roi["box_kd"]
        if s.mask_weight > 0:
            terms["mask_kd"] = mask_distill_loss(
                run.student, s_feats, t_dets, batch.image_sizes
            )
        weights = {
            "feature": s.feature_weight,
            "channel": s.channel_weight,
            "logit_kl": s.logit_weight,
            "box_kd": s.box_weight,
            "mask_kd": s.mask_weight,
        }
        loss = s.detection_weight * sum(terms[k] for k in DETECTION_TERMS if k in terms) + sum(
            w * terms[k] for k, w in weights.items() if k in terms
        )
    values = {k: float(v.detach()) for k, v in terms.items()}
    if not torch.isfinite(loss) or not all(math.isfinite(v) for v in values.values()):
        raise ConfigError(
            f"distillation diverged at step {step}: losses {values}; lower lr "
            f"(now {s.lr}) or the loss weights"
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if step < s.freeze_heads_steps:
        for p in run.frozen:
            p.grad = None
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.params, s.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    values["loss"] = float(loss.detach())
    values["pseudo_labels_per_image"] = (
        sum(len(p["boxes"]) for p in pseudo) / len(pseudo) if pseudo else 0.0
    )
    return values


def measure_feature_mse(
    teacher: MaskRCNN,
    student: MaskRCNN,
    images: list[np.ndarray],
    adapter: nn.Module | None = None,
) -> float:
    """Plain MSE between the two models' FPN levels at the same stride, averaged over levels.

    Both models run in eval mode on the student's transform of the images (the student's maps
    through ``adapter`` when the widths differ); the models' modes are restored afterwards.
    """
    device = next(student.parameters()).device
    modes = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        with torch.no_grad():
            tensors = [
                torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255).to(device)
                for im in images
            ]
            batch, _ = student.transform(tensors)
            t_feats = teacher.backbone(batch.tensors.to(next(teacher.parameters()).device))
            s_feats = student.backbone(batch.tensors)
            t_feats = {k: v.to(device) for k, v in t_feats.items()}
            errs = [
                F.mse_loss(
                    (adapter(s_feats[s_level]) if adapter is not None else s_feats[s_level])
                    .float(),
                    t_feats[t_level].float(),
                ).item()
                for s_level, t_level in match_levels(s_feats, t_feats)
            ]
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    return float(np.mean(errs))


def _fingerprint(
    teacher: MaskRCNN, spec: ArchSpec, data: CocoInstances | ImageFiles, settings: DistillSettings
) -> dict[str, Any]:
    """What a resumable run must agree on: settings, student architecture, teacher, images."""
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if isinstance(data, CocoInstances):
        names = [str(data.annotation_file)] + [
            data.coco.imgs[i]["file_name"] for i in data.image_ids
        ]
    else:
        names = [str(p) for p in data.paths]
    return {
        "settings": settings.cache_key(),
        "student_spec": spec.to_dict(),
        "teacher_sha256": digest.hexdigest(),
        "images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
    }


def _resolve_data(
    train: CocoInstances | list[Path] | Path, teacher_classes: int
) -> CocoInstances | ImageFiles:
    if isinstance(train, CocoInstances):
        if len(train) == 0:
            raise DatasetError(f"{train.annotation_file}: no images to distill on")
        if len(train.category_ids) + 1 != teacher_classes:
            raise DatasetError(
                f"{train.annotation_file} has {len(train.category_ids)} categories but the "
                f"teacher predicts {teacher_classes - 1} classes; give the teacher's own data set "
                "or distill on its images as a plain list (pseudo-labels only)"
            )
        return train
    paths = list_images(train) if isinstance(train, (str, Path)) else [Path(p) for p in train]
    if not paths:
        raise DatasetError("no training images given to distill: the list of image paths is empty")
    readable = []
    for p in paths:
        try:
            load_image(p)
            readable.append(p)
        except ImageReadError as err:
            log.warning("skipping %s", err)
    if not readable:
        raise DatasetError(
            f"none of the {len(paths)} training images could be read (first: {paths[0]})"
        )
    if len(readable) < len(paths):
        log.warning(
            "distilling on %d of %d images; the others could not be read", len(readable), len(paths)
        )
    return ImageFiles(readable)


def _labels_used(data: CocoInstances | ImageFiles, settings: DistillSettings) -> str:
    if settings.label_merge == "gt_only":
        return "ground truth only (no teacher)" if not settings.uses_teacher else "ground truth"
    if isinstance(data, CocoInstances) and settings.use_gt:
        return f"ground truth + teacher pseudo-labels ({settings.label_merge})"
    return "teacher pseudo-labels"


def _summary(history: list[dict[str, float]], last: int = 20) -> dict[str, float]:
    """Mean of each term over the last ``last`` steps."""
    recent = history[-last:]
    if not recent:
        return {}
    return {k: round(float(np.mean([h[k] for h in recent if k in h])), 4) for k in recent[-1]}


def _short(summary: dict[str, float]) -> str:
    return " ".join(
        f"{k.replace('loss_', '')}={v:.3f}"
        for k, v in summary.items()
        if k != "pseudo_labels_per_image"
    )


def _save_state(run: _Run, path: Path, step: int, fingerprint: dict[str, Any]) -> None:
    _save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "step": step,
            "student": run.student.state_dict(),
            "adapter": run.adapter.state_dict() if run.adapter is not None else None,
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "history": run.history,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None,
            "seconds": run.seconds,
            "feature_mse_before": run.feature_mse_before,
        },
        path,
    )


def _resume(run: _Run, path: Path, fingerprint: dict[str, Any]) -> int:
    """Load ``path`` into ``run`` when it holds this very run; return the step to go on from."""
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds; a damaged file only costs a fresh start
        log.warning("%s cannot be read (%s: %s); starting afresh", path, type(err).__name__, err)
        return 0
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s is not a distillation state; starting afresh", path)
        return 0
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        log.warning("%s holds a run with another %s; starting afresh", path, " and ".join(changed))
        return 0
    run.student.load_state_dict(state["student"])
    if run.adapter is not None:
        run.adapter.load_state_dict(state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if run.device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.history, run.seconds = state["history"], state["seconds"]
    run.feature_mse_before = state["feature_mse_before"]
    log.info("resuming distillation at step %d of %d (%s)", state["step"], run.settings.steps, path)
    return int(state["step"])


def _make_run(
    teacher: MaskRCNN,
    student_spec: ArchSpec,
    data: CocoInstances | ImageFiles,
    settings: DistillSettings,
    device: torch.device,
) -> _Run:
    """The seeded student, initialised from the teacher, with its optimizer; both on ``device``."""
    torch.manual_seed(settings.seed)
    student = build_model(student_spec)
    for attr in ("image_mean", "image_std"):
        if list(getattr(student.transform, attr)) != list(getattr(teacher.transform, attr)):
            raise ConfigError(
                f"teacher and student normalise images differently ({attr} "
                f"{teacher.transform.image_mean} vs {student.transform.image_mean}); distill "
                "from a teacher built by pipeline.models"
            )
    copied = copy_matching_parameters(teacher, student) if settings.init_from_teacher else []
    s_width, t_width = student.backbone.out_channels, teacher.backbone.out_channels
    adapter = nn.Conv2d(s_width, t_width, 1).to(device) if s_width != t_width else None
    student.to(device).train()
    named = dict(student.named_parameters())
    params = list(student.parameters()) + (list(adapter.parameters()) if adapter else [])
    return _Run(
        teacher=teacher,
        student=student,
        adapter=adapter,
        optimizer=torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay),
        scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
        data=data,
        settings=settings,
        device=device,
        copied=copied,
        frozen=[named[k] for k in copied if k in named],
        params=params,
    )


def distill(
    teacher: MaskRCNN,
    student_spec: ArchSpec,
    *,
    train: CocoInstances | list[Path],
    settings: DistillSettings,
    workdir: Path,
) -> tuple[MaskRCNN, dict[str, Any]]:
    """Distill a ``build_model(student_spec)`` student from ``teacher`` on ``train``.

    ``train`` is a COCO set (ground truth and pseudo-labels) or a list of image files
    (pseudo-labels only). Writes ``workdir/last.pt`` and resumes from it. Returns the student
    (CPU, eval mode) and a report: steps, seconds, final loss terms, settings, parameters and MACs
    of student and teacher at the deployment size and their ratio, what was copied from the
    teacher, the feature MSE to the teacher before and after, and the device.
    """
    teacher_classes = int(teacher.roi_heads.box_predictor.cls_score.out_features)
    if student_spec.num_classes != teacher_classes:
        raise ConfigError(
            f"student_spec.num_classes={student_spec.num_classes} but the teacher predicts "
            f"{teacher_classes} (background included); they must agree"
        )
    data = _resolve_data(train, teacher_classes)
    if settings.label_merge == "gt_only" and isinstance(data, ImageFiles):
        raise ConfigError(
            "label_merge='gt_only' (the ground-truth baseline) needs a labelled COCO set; "
            f"got {len(data)} unlabelled images"
        )
    ckpt_path = Path(workdir) / "last.pt"
    device = pick_device()
    t0 = time.time()
    log.info(
        "distilling a %s student (%d px) on %d images for %d steps -> %s",
        student_spec.backbone,
        student_spec.image_size,
        len(data),
        settings.steps,
        ckpt_path,
    )

    teacher_mode, teacher_device = teacher.training, next(teacher.parameters()).device
    try:
        teacher.to(device).eval()
        run = _make_run(teacher, student_spec, data, settings, device)
        fingerprint = _fingerprint(teacher, student_spec, data, settings)
        start = _resume(run, ckpt_path, fingerprint)
        probe = [data.load_image(i) for i in data.image_ids[:8]]
        if run.feature_mse_before is None:
            run.feature_mse_before = measure_feature_mse(teacher, run.student, probe, run.adapter)

        run_t0, seconds_before = time.time(), run.seconds
        with step_progress("distill", settings.steps, start) as advance:
            for step in range(start, settings.steps):
                terms = _distill_step(run, step)
                run.history.append({k: round(v, 5) for k, v in terms.items()})
                run.seconds = seconds_before + time.time() - run_t0
                advance(_short(_summary(run.history)))
                if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                    _save_state(run, ckpt_path, step + 1, fingerprint)
        seconds_this_run = time.time() - run_t0
        feature_mse_after = measure_feature_mse(teacher, run.student, probe, run.adapter)

        student = run.student.cpu().eval()
        teacher.cpu()
        size = student_spec.image_size
        student_macs, teacher_macs = count_macs(student, size), count_macs(teacher, size)
    finally:
        teacher.to(teacher_device).train(teacher_mode)

    trained = settings.steps - start
    named = dict(student.named_parameters())
    report = {
        "steps": settings.steps,
        "resumed_from_step": start,
        "seconds": round(run.seconds, 1),
        "seconds_this_run": round(seconds_this_run, 1),
        "seconds_per_step": round(seconds_this_run / trained, 3) if trained else None,
        "final_losses": _summary(run.history),
        "settings": asdict(settings),
        "student_spec": student_spec.to_dict(),
        "images": len(data),
        "labels": _labels_used(data, settings),
        "copied_from_teacher": {
            "tensors": len(run.copied),
            "parameters": sum(named[k].numel() for k in run.copied if k in named),
            "modules": sorted({k.rsplit(".", 1)[0] for k in run.copied}),
        },
        "feature_adapter": run.adapter is not None,
        "feature_mse": {
            "before": round(run.feature_mse_before, 5),
            "after": round(feature_mse_after, 5),
        },
        "student_parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
        "student_macs": student_macs,
        "teacher_macs": teacher_macs,
        "mac_ratio": round(teacher_macs["total"] / student_macs["total"], 2),
        "device": device.type,
    }
    log.info(
        "distilled student -> %s: %d steps, %.0f s, %.1fx fewer MACs than the teacher, "
        "feature MSE to the teacher %.3f -> %.3f",
        ckpt_path,
        settings.steps,
        time.time() - t0,
        report["mac_ratio"],
        run.feature_mse_before,
        feature_mse_after,
    )
    return student, report
