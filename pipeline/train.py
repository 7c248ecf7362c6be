"""Supervised training of a torchvision Mask R-CNN, resumable, for the demo teacher.

``train_detector`` runs a seeded, step-based loop (AdamW, linear warm-up, cosine decay,
horizontal flips) on a COCO set and writes ``<workdir>/last.pt`` every ``checkpoint_every``
steps (atomically); called again with the same workdir and settings it resumes from that file.
CUDA is used when present (with mixed precision); on CPU the loop is deterministic.

``train_demo_teacher`` is what ``invoke train-demo`` runs: it generates the demo set, trains the
teacher, measures its val box/mask AP and writes ``demo/teacher.pt`` (fp16 weights) and
``demo/teacher.json`` (how it was trained and what it scored).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.datasets import CocoInstances
from pipeline.errors import ConfigError
from pipeline.models import ArchSpec, build_model, count_macs, count_parameters, teacher_spec
from pipeline.progress import step_progress

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "demo" / "teacher.pt"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1600
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return 0.05 + 0.95 * step / settings.warmup_steps
    t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the images in batch ``step``: epoch-wise shuffles, reproducible from ``step``."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        order = np.random.default_rng((seed, epoch)).permutation(n)
        out.append(int(order[pos]))
    return out


def load_batch(data: CocoInstances, indices: list[int], step: int, seed: int,
               device: torch.device, positions: Sequence[int] | None = None
               ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images and targets of batch ``step``, each flipped at random (seeded by step).

    ``positions`` (default: all) picks which of ``indices`` to load; the flips are drawn for the
    whole batch first, so a shard of it sees the very flips the whole batch would.
    """
    rng = np.random.default_rng((seed, 1_000_003, step))
    flips = [rng.random() < 0.5 for _ in indices]
    picked = range(len(indices)) if positions is None else positions
    images, targets = [], []
    for pos in picked:
        image_id = data.image_ids[indices[pos]]
        img = data.load_image(image_id)
        tgt = data.target(image_id)
        if flips[pos]:
            w = img.shape[1]
            img = img[:, ::-1]
            boxes = tgt["boxes"].copy()
            boxes[:, [0, 2]] = w - tgt["boxes"][:, [2, 0]]
            tgt = {**tgt, "boxes": boxes, "masks": tgt["masks"][:, :, ::-1]}
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
                      .div(255).to(device))
        targets.append({
            "boxes": torch.from_numpy(tgt["boxes"]).to(device),
            "labels": torch.from_numpy(tgt["labels"]).to(device),
            "masks": torch.from_numpy(np.ascontiguousarray(tgt["masks"])).to(device),
        })
    return images, targets


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_detector(model: torch.nn.Module, data: CocoInstances, settings: TrainSettings,
                   workdir: Path, description: str = "training") -> dict[str, Any]:
    """Train ``model`` on ``data``; resume from ``workdir/last.pt`` when it matches settings."""

    device = pick_device()
    torch.manual_seed(settings.seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    ckpt_path = workdir / "last.pt"
    start, history = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = dict(state["settings"])
        same_but_length = {**saved, "steps": settings.steps} == asdict(settings)
        if same_but_length and state["step"] <= settings.steps:
            if saved["steps"] != settings.steps:
                log.warning("%s: continuing a run of %d steps as one of %d steps (the learning-"
                            "rate schedule is stretched from here)", ckpt_path, saved["steps"],
                            settings.steps)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start, history = state["step"], state["history"]
            torch.set_rng_state(state["torch_rng"])
            log.info("resuming %s from step %d (%s)", description, start, ckpt_path)
        else:
            log.warning("%s holds a run with other settings; starting afresh", ckpt_path)
    t0 = time.time()
    with step_progress(description, settings.steps, start) as advance:
        for step in range(start, settings.steps):
            for g in opt.param_groups:
                g["lr"] = settings.lr * lr_factor(step, settings)
            idx = batch_indices(step, len(data), settings.batch_size, settings.seed)
            images, targets = load_batch(data, idx, step, settings.seed, device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                losses = model(images, targets)
                loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            scaler.step(opt)
            scaler.update()
            history.append({k: round(float(v.detach()), 4) for k, v in losses.items()})
            recent = history[-20:]
            shown = " ".join(f"{k.replace('loss_', '')}={np.mean([h[k] for h in recent]):.3f}"
                             for k in recent[-1])
            advance(shown)
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "step": step + 1, "history": history,
                              "settings": asdict(settings), "torch_rng": torch.get_rng_state()},
                             ckpt_path)
    model.eval()
    return {"steps": settings.steps, "seconds_this_run": round(time.time() - t0, 1),
            "final_losses": history[-1] if history else {}, "device": device.type}


def save_checkpoint(model: torch.nn.Module, spec: ArchSpec, class_names: list[str],
                    category_ids: list[int], path: Path, fp16: bool = True,
                    extra: dict[str, Any] | None = None) -> None:
    """Write a self-describing maskedge checkpoint (weights-only loadable)."""
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).cpu()
             for k, v in model.state_dict().items()}
    _save_atomic({"format": "maskedge-checkpoint", "format_version": 1, "arch": spec.to_dict(),
                  "class_names": list(class_names), "category_ids": list(category_ids),
                  "state_dict": state, **(extra or {})}, path)


def train_demo_teacher(artifacts: Path, settings: TrainSettings = TrainSettings(),
                       out: Path = DEMO_TEACHER) -> dict[str, Any]:
    """Generate the demo set, train the demo teacher, measure it, write it to ``out``."""
    from pipeline.demo import CLASS_NAMES, DemoSpec, ensure_demo_data
    from pipeline.evaluate import TorchPredictor, evaluate_coco

    demo_spec = DemoSpec()
    splits = ensure_demo_data(artifacts / "demo_data", demo_spec)
    train = CocoInstances(splits["train"] / "annotations.json", splits["train"] / "images")
    val = CocoInstances(splits["val"] / "annotations.json", splits["val"] / "images")
    spec = teacher_spec(num_classes=len(CLASS_NAMES) + 1)
    model = build_model(spec)
    run = train_detector(model, train, settings, artifacts / "train-demo", "train-demo teacher")
    model.cpu().eval()
    metrics = evaluate_coco(TorchPredictor(model), val)
    meta = {
        "what": "maskedge demo teacher: torchvision MaskRCNN, ResNet-18 FPN, trained from scratch "
                "on the synthetic demo set",
        "arch": spec.to_dict(),
        "class_names": list(CLASS_NAMES),
        "demo_data": asdict(demo_spec),
        "training": asdict(settings),
        "run": run,
        "parameters": count_parameters(model),
        "macs": count_macs(model, spec.image_size),
        "val_metrics": metrics,
        "torch": torch.__version__,
    }
    save_checkpoint(model, spec, list(CLASS_NAMES), [1, 2, 3], out,
                    extra={"metadata": {k: meta[k] for k in ("training", "val_metrics")}})
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("demo teacher -> %s (val mask AP50 %.3f, box AP50 %.3f)", out,
             metrics["mask_ap50"], metrics["box_ap50"])
    return meta
