"""The distill stage: train the edge student from the teacher.

The student is ``build_model(student_spec)`` (a torchvision ``MaskRCNN``, MobileNetV3-Large FPN by
default, ResNet-18 FPN with ``student_spec(backbone="resnet18")``). It learns from these signals,
each switchable and weighted in :class:`DistillSettings` (a weight of 0 switches a term off):

- *parameter distillation* (``init_from_teacher``): every student module whose parameters and
  buffers all have a namesake of the same shape in the teacher is copied from it before training
  (with the demo architectures: the FPN output convs, the RPN head, the box head and the box
  predictor, about 40 % of the student's weights; the MobileNet body, the FPN lateral convs and
  the narrower mask head start fresh), and can be held fixed for the first
  ``freeze_heads_steps`` steps;
- *detection losses* (``detection_weight``; torchvision's own RPN, box and mask losses) on teacher
  pseudo-labels (teacher detections scoring at least ``pseudo_label_threshold``, masks pasted and
  thresholded at 0.5) and, when ``train`` is a COCO set, on its ground truth (``label_merge``:
  ``"union"`` adds the pseudo-labels that overlap no ground-truth box at IoU >= 0.5;
  ``"gt_first"`` uses ground truth alone wherever an image is annotated; ``"gt_only"`` never
  uses pseudo-labels);
- *FPN feature imitation* (``feature_weight``): MSE between student and teacher FPN levels at the
  same stride (:func:`match_levels`; a teacher with a stride-4 level, like torchvision's
  ResNet-50 FPN, pairs by stride, not by name), averaged over the cells whose centre lies inside
  a target box, plus ``feature_global_weight`` times the MSE over the whole map, divided by the
  teacher's mean square per level so that the weight does not depend on the teacher's feature
  scale (a learned 1x1 adapter maps the student's width to the teacher's when they differ; it is
  not part of the student);
- *channel-wise distillation* (``channel_weight``, off by default; ``channel_temperature``): per
  channel of each matched level, ``T^2 * KL`` between the teacher's and the student's spatial
  softmax (:func:`channel_wise_loss`);
- *RoI distillation* on the teacher's RPN proposals, both box heads pooling from their own
  features: class logits (``logit_weight``, ``T^2 * KL`` at ``temperature``), box regression
  (``box_weight``, smooth-L1 to the teacher's deltas of its most likely class, weighted by that
  probability) (:func:`roi_distill_losses`), and mask logits (``mask_weight``, per-pixel BCE
  toward the teacher's mask probabilities on its own detections, weighted by score)
  (:func:`mask_distill_loss`).

Both models see the same batch, resized and normalised by the student's transform (so the teacher
runs at the student's input size), horizontally flipped at random as in :mod:`pipeline.train`.
The teacher is only read: eval mode and ``no_grad``; its mode and device are restored afterwards.

Reads: the teacher module, the training images (a ``CocoInstances`` set, or image files for
pseudo-label-only distillation). Writes: ``<workdir>/last.pt`` every ``checkpoint_every`` steps
and at the end (atomically; student, adapter, optimizer and RNG state, loss history). Called again
with the same workdir, teacher, images and settings, ``distill`` resumes from that file to the
same weights as an uninterrupted run (on CPU), and a finished run is returned without training.

Multi-process (``torchrun``, e.g. ``invoke distill --nproc N``): when ``WORLD_SIZE`` > 1,
:func:`distill` starts the process group (NCCL on CUDA, each process on its ``LOCAL_RANK`` GPU;
gloo on CPU) unless the caller has, and tears down the one it started. ``batch_size`` stays the
global batch: process ``r`` of ``N`` trains on positions ``r*B/N .. (r+1)*B/N - 1`` of every batch
(same images, same flips as one process), so ``N`` must divide ``batch_size``. The student and
adapter run under DDP (gradients averaged), the student's BatchNorm layers use the statistics of
the whole batch (:class:`GlobalBatchNorm2d`, differentiable all-reduces; torch's
``SyncBatchNorm`` has no CPU path), the distillation terms normalise by whole-batch counts
(:class:`BatchShards`), and the logged losses are averaged over the processes. Only process 0
writes ``last.pt``, logs and shows progress; every process resumes from the same ``last.pt`` and
checks that they agree on the step. The result is the one-process run's up to float rounding,
except for what the next limits say.

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
- on CUDA (mixed precision) a resumed run is close to, not bit-identical with, an uninterrupted one;
- multi-process runs differ from one process on the same batches in two places: torchvision's
  RPN and RoI samplers draw from a random stream per process and step (seeded from ``seed``, step
  and rank, so a multi-process run is itself deterministic on CPU and resumes to the same
  weights), and torchvision's ``loss_mask`` averages over the positive RoIs of each process's
  shard, not of the whole batch. Without detection losses the 2-process run matches one process
  to about 6e-4 of the weight change (tests/test_distill_ddp.py). Images that resize to different
  shapes are padded per shard, not per batch;
- a multi-process run resumed with another process count continues correctly but samples
  differently from an uninterrupted run (a warning says so); the workdir must be one folder that
  every process sees (on several nodes: a shared file system);
- the per-process batch is ``batch_size / N``: more processes make each step faster, not the
  batch larger; raise ``batch_size`` (and ``lr``) yourself to use more GPUs for a larger batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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
    feature_weight: float = 3.0
    feature_global_weight: float = 0.1
    logit_weight: float = 1.0
    temperature: float = 2.0
    channel_weight: float = 0.0
    channel_temperature: float = 4.0
    box_weight: float = 1.0
    mask_weight: float = 1.0
    pseudo_label_threshold: float = 0.5
    use_gt: bool = True
    label_merge: str = "gt_first"
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


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes ``torchrun`` started (alone: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the checkpoint, the log and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


@contextmanager
def process_group() -> Iterator[Ranks]:
    """The process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1), started and torn down here.

    Uses NCCL when CUDA is present (each process on its ``LOCAL_RANK`` GPU) and gloo otherwise.
    A group the caller already started is used as it is and left running; without ``torchrun``
    (no ``WORLD_SIZE`` or 1) this yields rank 0 of 1 and starts nothing.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        yield Ranks()
        return
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size(), local_rank)
        return
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (--nproc)"
            )
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group("nccl" if cuda else "gloo")
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"WORLD_SIZE={world_size} but the process group did not start ({err}); launch "
            "multi-process distillation through torchrun (invoke distill --nproc N)"
        ) from err
    try:
        yield Ranks(rank, world_size, local_rank)
    finally:
        dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over processes is summed too."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, _SumOverRanks.apply(tensor))


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch of all processes.

    Each process normalises its shard with the mean and variance of every shard together (two
    differentiable all-reduces), so training matches one process on the whole batch, and the
    running statistics, updated from the same global figures, stay equal on every process. It
    works with gloo on CPU, where torch's ``SyncBatchNorm`` does not. In eval mode, or with no
    process group, it is a plain ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        xf = x.float()
        count = xf.new_tensor([xf.numel() / xf.shape[1]])
        total = _sum_over_ranks(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean[None, :, None, None]
        var = _sum_over_ranks(centred.pow(2).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def swap_batchnorm(module: nn.Module, cls: type[nn.BatchNorm2d]) -> int:
    """Replace every ``BatchNorm2d`` in ``module`` by a ``cls`` holding the same parameters and
    buffers (so state dicts and optimizers are unaffected); returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and type(child) is not cls:
            new = cls(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            for key in ("weight", "bias"):
                setattr(new, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                new.register_buffer(key, getattr(child, key))
            new.train(child.training)
            setattr(module, name, new)
            replaced += 1
        else:
            replaced += swap_batchnorm(child, cls)
    return replaced


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one process for one step of a multi-process run."""
    return int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0])


@dataclass(frozen=True)
class BatchShards:
    """A batch split evenly over ``world_size`` processes: batch-level means over all of them.

    ``mean(num, den)`` is this process's part of ``sum(num) / sum(den)`` over the processes,
    scaled so that DDP's gradient average gives the mean of the whole batch: a loss normalised
    by a per-batch count (object cells, RoIs, detection scores) weighs every image as one
    process on the whole batch would. The denominators carry no gradient.
    """

    world_size: int

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes (no gradient)."""
        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def mean(self, num: torch.Tensor, den: torch.Tensor, min_den: float) -> torch.Tensor:
        return num * self.world_size / self.total(den).clamp(min=min_den)


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
    losses: nn.Module
    ranks: Ranks = field(default_factory=Ranks)
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
    *,
    shards: BatchShards | None = None,
) -> torch.Tensor:
    """Object-weighted, scale-free MSE between FPN levels at the same stride, averaged.

    Per matched level pair (:func:`match_levels`): the channel-mean squared error averaged over
    the cells inside target boxes (zero when a batch has none), plus ``global_weight`` times the
    mean over all cells, both divided by the teacher's mean squared activation on that level, so
    that a student predicting zeros scores about ``1 + global_weight`` whatever the teacher's
    feature scale. With ``shards`` the means are over the whole batch of every process.
    """
    terms = []
    for s_level, t_level in match_levels(student_features, teacher_features):
        s = student_features[s_level].float()
        if adapter is not None:
            s = adapter(s)
        t = teacher_features[t_level].float()
        if shards is None:
            err = (s - t).pow(2).mean(dim=1) / t.pow(2).mean().clamp(min=1e-6)  # (B, h, w)
            weight = object_mask(boxes, (err.shape[1], err.shape[2]), input_hw)
            local = (err * weight).sum() / weight.sum().clamp(min=1.0)
            terms.append(local + global_weight * err.mean())
            continue
        scale = shards.total(torch.stack([t.pow(2).sum(), t.new_tensor(float(t.numel()))]))
        err = (s - t).pow(2).mean(dim=1) / (scale[0] / scale[1]).clamp(min=1e-6)
        weight = object_mask(boxes, (err.shape[1], err.shape[2]), input_hw)
        local = shards.mean((err * weight).sum(), weight.sum(), 1.0)
        overall = shards.mean(err.sum(), err.new_tensor(float(err.numel())), 1.0)
        terms.append(local + global_weight * overall)
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
    *,
    shards: BatchShards | None = None,
) -> dict[str, torch.Tensor]:
    """Class-logit and box-regression distillation on the teacher's proposals.

    Both box heads run on the same proposals, each pooling from its own features.
    ``logit_kl``: ``T^2 * KL(teacher || student)`` of the class softmax per RoI. ``box_kd``:
    smooth-L1 between the two heads' regression deltas for the teacher's most likely foreground
    class, weighted by the teacher's probability of that class, so background RoIs count little.
    With ``shards`` both are means over the RoIs of every process.
    """
    with torch.no_grad():
        t_rois = teacher.roi_heads.box_roi_pool(teacher_features, proposals, image_sizes)
        t_logits, t_deltas = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(t_rois))
    s_rois = student.roi_heads.box_roi_pool(student_features, proposals, image_sizes)
    s_logits, s_deltas = student.roi_heads.box_predictor(student.roi_heads.box_head(s_rois))
    n = s_logits.shape[0]
    if n == 0:
        zero = s_logits.sum() * 0.0
        if shards is not None:  # the other processes' means still need this one's count
            shards.mean(zero, zero.detach(), 1.0)
            shards.mean(zero, zero.detach(), 1e-6)
        return {"logit_kl": zero, "box_kd": zero}
    t = temperature
    if shards is not None:
        return _roi_distill_over_shards(s_logits, s_deltas, t_logits, t_deltas, t, shards)
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


def _roi_distill_over_shards(
    s_logits: torch.Tensor,
    s_deltas: torch.Tensor,
    t_logits: torch.Tensor,
    t_deltas: torch.Tensor,
    t: float,
    shards: BatchShards,
) -> dict[str, torch.Tensor]:
    """:func:`roi_distill_losses`' two terms with their means taken over every process."""
    n = s_logits.shape[0]
    kl_sum = F.kl_div(
        F.log_softmax(s_logits.float() / t, dim=1),
        F.softmax(t_logits.float() / t, dim=1),
        reduction="sum",
    ) * (t * t)
    logit_kl = shards.mean(kl_sum, kl_sum.new_tensor(float(n)), 1.0)
    fg_prob, fg_class = F.softmax(t_logits.float(), dim=1)[:, 1:].max(dim=1)
    rows = torch.arange(n, device=s_logits.device)
    s_d = s_deltas.float().reshape(n, -1, 4)[rows, fg_class + 1]
    t_d = t_deltas.float().reshape(n, -1, 4)[rows, fg_class + 1]
    per_roi = F.smooth_l1_loss(s_d, t_d, beta=1.0 / 9, reduction="none").sum(dim=1)
    box_kd = shards.mean((per_roi * fg_prob).sum(), fg_prob.sum(), 1e-6)
    return {"logit_kl": logit_kl, "box_kd": box_kd}


def mask_distill_loss(
    student: MaskRCNN,
    student_features: dict[str, torch.Tensor],
    teacher_detections: list[dict[str, torch.Tensor]],
    image_sizes: list[tuple[int, int]],
    min_score: float = 0.05,
    per_image: int = 32,
    *,
    shards: BatchShards | None = None,
) -> torch.Tensor:
    """Mask-logit distillation: per-pixel BCE of the student's mask logits on the teacher's boxes.

    For each image the teacher's ``per_image`` best detections scoring at least ``min_score``
    are pooled from the student's features; the student's mask logit of the teacher's class is
    trained toward the teacher's mask probability (its own 28x28 output, resized if the heads'
    resolutions differ), weighted by the detection's score. With ``shards`` the weighted mean is
    over the detections of every process.
    """
    boxes, labels, probs, scores = [], [], [], []
    for det in teacher_detections:
        keep = torch.nonzero(det["scores"] >= min_score).flatten()[:per_image]
        boxes.append(det["boxes"][keep].float())
        labels.append(det["labels"][keep])
        probs.append(det["masks"][keep, 0].float())
        scores.append(det["scores"][keep].float())
    if sum(len(b) for b in boxes) == 0:
        zero = next(iter(student_features.values())).sum() * 0.0
        if shards is not None:  # the other processes' mean still needs this one's weight
            return shards.mean(zero, zero.detach(), 1e-6)
        return zero
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
    if shards is not None:
        return shards.mean((per_mask * weight).sum(), weight.sum(), 1e-6)
    return (per_mask * weight).sum() / weight.sum().clamp(min=1e-6)


class StudentLosses(nn.Module):
    """The student's loss terms on one batch, as a module, so that DDP can wrap the student.

    Holds the student and the feature adapter (their parameters are this module's); the teacher
    and its outputs come in as arguments, so the teacher is never synchronised or trained.
    """

    def __init__(
        self,
        student: MaskRCNN,
        adapter: nn.Module | None,
        settings: DistillSettings,
        shards: BatchShards | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.adapter = adapter
        self.settings = settings
        self.shards = shards

    def forward(
        self,
        batch: ImageList,
        targets: list[dict[str, torch.Tensor]],
        teacher: MaskRCNN,
        teacher_features: dict[str, torch.Tensor] | None,
        teacher_proposals: list[torch.Tensor] | None,
        teacher_detections: list[dict[str, torch.Tensor]] | None,
    ) -> dict[str, torch.Tensor]:
        s, student = self.settings, self.student
        input_hw = (int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1]))
        s_feats = student.backbone(batch.tensors)
        terms: dict[str, torch.Tensor] = {}
        if s.detection_weight > 0:
            props, rpn_losses = student.rpn(batch, s_feats, targets)
            _, roi_losses = student.roi_heads(s_feats, props, batch.image_sizes, targets)
            terms.update({k: v.float() for k, v in {**rpn_losses, **roi_losses}.items()})
        if not s.uses_teacher:
            return terms
        assert teacher_features is not None and teacher_proposals is not None
        assert teacher_detections is not None
        if s.feature_weight > 0:
            terms["feature"] = feature_imitation_loss(
                s_feats,
                teacher_features,
                [t["boxes"] for t in targets],
                input_hw,
                s.feature_global_weight,
                self.adapter,
                shards=self.shards,
            )
        if s.channel_weight > 0:
            terms["channel"] = channel_wise_loss(
                s_feats, teacher_features, s.channel_temperature, self.adapter
            )
        if s.logit_weight > 0 or s.box_weight > 0:
            roi = roi_distill_losses(
                teacher,
                student,
                teacher_features,
                s_feats,
                teacher_proposals,
                batch.image_sizes,
                s.temperature,
                shards=self.shards,
            )
            if s.logit_weight > 0:
                terms["logit_kl"] = roi["logit_kl"]
            if s.box_weight > 0:
                terms["box_kd"] = roi["box_kd"]
        if s.mask_weight > 0:
            terms["mask_kd"] = mask_distill_loss(
                student, s_feats, teacher_detections, batch.image_sizes, shards=self.shards
            )
        return terms


def _prepare_batch(run: _Run, step: int) -> tuple[ImageList, list[dict[str, torch.Tensor]]]:
    """This process's share of batch ``step``: all of it, or its slice in a multi-process run."""
    s, ranks = run.settings, run.ranks
    idx = batch_indices(step, len(run.data), s.batch_size, s.seed)
    positions = None
    if ranks.distributed:
        share = s.batch_size // ranks.world_size
        positions = range(ranks.rank * share, (ranks.rank + 1) * share)
    images, targets = load_batch(
        cast(CocoInstances, run.data), idx, step, s.seed, run.device, positions=positions
    )
    if not s.use_gt:
        targets = [{k: v[:0] for k, v in t.items()} for t in targets]
    batch, resized = run.student.transform(images, targets)
    assert resized is not None
    return batch, resized


def _any_rank(flag: bool, run: _Run) -> bool:
    """Whether ``flag`` holds on any process (on this one, in a one-process run)."""
    if not run.ranks.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=run.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _mean_over_ranks(values: dict[str, float], run: _Run) -> dict[str, float]:
    """Each value averaged over the processes (their shards are equal, so: over the batch)."""
    if not run.ranks.distributed:
        return values
    keys = list(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=run.device)
    dist.all_reduce(stacked)
    return {k: float(v) / run.ranks.world_size for k, v in zip(keys, stacked.tolist(), strict=True)}


def _distill_step(run: _Run, step: int) -> dict[str, float]:
    """One optimisation step; returns the loss terms and the pseudo-labels per image.

    In a multi-process run every process steps on its shard of the batch, DDP averages the
    gradients, and the returned figures are averaged over the processes.
    """
    s, device = run.settings, run.device
    if run.ranks.distributed:  # samplers draw from a stream of their own per process and step
        torch.manual_seed(_rank_seed(s.seed, step, run.ranks.rank))
    for group in run.optimizer.param_groups:
        group["lr"] = s.lr * lr_factor(step, s.schedule())
    batch, gt = _prepare_batch(run, step)
    amp = device.type == "cuda"
    pseudo: list[dict[str, torch.Tensor]] = []
    t_feats = t_props = t_dets = None
    if s.uses_teacher:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            t_feats = run.teacher.backbone(batch.tensors)
            t_props, _ = run.teacher.rpn(batch, t_feats)
            t_dets, _ = run.teacher.roi_heads(t_feats, t_props, batch.image_sizes)
        if s.label_merge != "gt_only":
            pseudo = pseudo_labels(t_dets, batch.image_sizes, s.pseudo_label_threshold)
    targets = merge_targets(gt, pseudo, s.label_merge)
    with torch.autocast(device.type, enabled=amp):
        terms = run.losses(batch, targets, run.teacher, t_feats, t_props, t_dets)
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
    finite = bool(torch.isfinite(loss)) and all(math.isfinite(v) for v in values.values())
    if _any_rank(not finite, run):
        where = ""
        if run.ranks.distributed:
            where = f" (process {run.ranks.rank} of {run.ranks.world_size}; all of them stop)"
        raise ConfigError(
            f"distillation diverged at step {step}: losses {values}{where}; lower lr "
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
    return _mean_over_ranks(values, run)


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
            "processes": run.ranks.world_size,
        },
        path,
    )


def _resume(run: _Run, path: Path, fingerprint: dict[str, Any]) -> int:
    """Load ``path`` into ``run`` when it holds this very run; return the step to go on from.

    Every process of a multi-process run reads the same file; only the main one logs.
    """
    warn = log.warning if run.ranks.main else log.debug
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds; a damaged file only costs a fresh start
        warn("%s cannot be read (%s: %s); starting afresh", path, type(err).__name__, err)
        return 0
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        warn("%s is not a distillation state; starting afresh", path)
        return 0
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        warn("%s holds a run with another %s; starting afresh", path, " and ".join(changed))
        return 0
    saved_processes = int(state.get("processes", 1))
    if saved_processes != run.ranks.world_size:
        warn(
            "%s was written by a run of %d process(es); continuing it with %d, so its remaining "
            "steps sample differently from an uninterrupted run",
            path,
            saved_processes,
            run.ranks.world_size,
        )
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
    if run.ranks.main:
        log.info(
            "resuming distillation at step %d of %d (%s)", state["step"], run.settings.steps, path
        )
    return int(state["step"])


def _agree_on_start(start: int, run: _Run, path: Path) -> int:
    """Check that every process resumes from the same step (they read the same ``path``)."""
    if not run.ranks.distributed:
        return start
    bounds = torch.tensor([start, -start], dtype=torch.int64, device=run.device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    high, low = int(bounds[0]), -int(bounds[1])
    if high != low:
        raise ConfigError(
            f"the processes found different states in {path} (steps {low} to {high}); the "
            "workdir must be one folder that every process (every node) sees"
        )
    return start


def _pick_device(ranks: Ranks) -> torch.device:
    """CUDA when present (this process's ``LOCAL_RANK`` GPU in a multi-process run), else CPU."""
    if ranks.distributed and torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank)
    return pick_device()


def _leaves_parameters_unused(settings: DistillSettings, adapter: nn.Module | None) -> bool:
    """Whether some student (or adapter) parameters get no gradient with these loss terms.

    Without detection losses the RPN head is never run; without feature or channel terms the
    adapter is not. DDP must then search the graph for unused parameters every step.
    """
    no_adapter_term = settings.feature_weight == 0 and settings.channel_weight == 0
    return settings.detection_weight == 0 or (adapter is not None and no_adapter_term)


def _make_run(
    teacher: MaskRCNN,
    student_spec: ArchSpec,
    data: CocoInstances | ImageFiles,
    settings: DistillSettings,
    device: torch.device,
    ranks: Ranks,
) -> _Run:
    """The seeded student, initialised from the teacher, with its optimizer; both on ``device``.

    In a multi-process run the student's BatchNorm layers use global-batch statistics
    (:class:`GlobalBatchNorm2d`) and its losses run through DDP.
    """
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
    if ranks.distributed:
        swap_batchnorm(student, GlobalBatchNorm2d)
    student.to(device).train()
    named = dict(student.named_parameters())
    params = list(student.parameters()) + (list(adapter.parameters()) if adapter else [])
    shards = BatchShards(ranks.world_size) if ranks.distributed else None
    losses: nn.Module = StudentLosses(student, adapter, settings, shards)
    if ranks.distributed:
        losses = DistributedDataParallel(
            losses,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # GlobalBatchNorm2d keeps the buffers equal everywhere
            find_unused_parameters=_leaves_parameters_unused(settings, adapter),
        )
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
        losses=losses,
        ranks=ranks,
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
    teacher, the feature MSE to the teacher before and after, the device and the processes.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same arguments; each
    trains on its slice of every batch (see the module docstring), only the first writes the
    checkpoint, the log and the progress, and all return the same student and report.
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
    with process_group() as ranks:
        if settings.batch_size % ranks.world_size:
            raise ConfigError(
                f"batch_size={settings.batch_size} does not split evenly over "
                f"{ranks.world_size} processes; use a process count that divides it or a "
                f"batch_size that is a multiple of {ranks.world_size}"
            )
        return _distill_on(teacher, student_spec, data, settings, ckpt_path, ranks)


def _distill_on(
    teacher: MaskRCNN,
    student_spec: ArchSpec,
    data: CocoInstances | ImageFiles,
    settings: DistillSettings,
    ckpt_path: Path,
    ranks: Ranks,
) -> tuple[MaskRCNN, dict[str, Any]]:
    device = _pick_device(ranks)
    t0 = time.time()
    if ranks.main:
        log.info(
            "distilling a %s student (%d px) on %d images for %d steps%s -> %s",
            student_spec.backbone,
            student_spec.image_size,
            len(data),
            settings.steps,
            f" on {ranks.world_size} processes" if ranks.distributed else "",
            ckpt_path,
        )

    teacher_mode, teacher_device = teacher.training, next(teacher.parameters()).device
    try:
        teacher.to(device).eval()
        run = _make_run(teacher, student_spec, data, settings, device, ranks)
        fingerprint = _fingerprint(teacher, student_spec, data, settings)
        start = _agree_on_start(_resume(run, ckpt_path, fingerprint), run, ckpt_path)
        probe = [data.load_image(i) for i in data.image_ids[:8]]
        if run.feature_mse_before is None:
            run.feature_mse_before = measure_feature_mse(teacher, run.student, probe, run.adapter)

        run_t0, seconds_before = time.time(), run.seconds
        progress = (
            step_progress("distill", settings.steps, start)
            if ranks.main
            else nullcontext(lambda status: None)
        )
        with progress as advance:
            for step in range(start, settings.steps):
                terms = _distill_step(run, step)
                run.history.append({k: round(v, 5) for k, v in terms.items()})
                run.seconds = seconds_before + time.time() - run_t0
                advance(_short(_summary(run.history)))
                last = step + 1 == settings.steps
                if ranks.main and ((step + 1) % settings.checkpoint_every == 0 or last):
                    _save_state(run, ckpt_path, step + 1, fingerprint)
        if ranks.distributed:
            dist.barrier()  # last.pt is complete before any process returns
            run.losses = cast(DistributedDataParallel, run.losses).module  # DDP goes first
            swap_batchnorm(run.student, nn.BatchNorm2d)
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
        "processes": ranks.world_size,
    }
    if ranks.main:
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
