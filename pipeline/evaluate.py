"""COCO box and mask AP with pycocotools, for PyTorch models and for the bundle runner alike.

Every predictor is a callable ``image (HxWx3 uint8) -> Detections`` in original image
coordinates. PyTorch models are wrapped by :class:`TorchPredictor`, which feeds them the one
letterboxed preprocessing and maps results back with the runner's own mask pasting, so teacher,
FP32 student and INT8 student are measured on exactly the same inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable

import numpy as np

from maskedge_runner.detections import Detections
from maskedge_runner.postprocess import paste_masks
from maskedge_runner.preprocess import boxes_to_original, letterbox
from pipeline.datasets import CocoInstances

log = logging.getLogger(__name__)


Predictor = Callable[[np.ndarray], Detections]


class TorchPredictor:
    """A torchvision Mask R-CNN behind the one preprocessing and the runner's mask pasting."""

    def __init__(self, model, device=None) -> None:
        import torch

        self.torch = torch
        self.device = device or next(model.parameters()).device
        self.model = model.eval()
        self.size = model.transform.min_size[0]

    def raw(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Model-frame results for a letterboxed input: boxes, scores, labels, masks (N,28,28)."""
        torch = self.torch
        with torch.no_grad():
            images = [torch.from_numpy(x[0]).to(self.device)]
            batch, _ = self.model.transform(images)
            features = self.model.backbone(batch.tensors)
            proposals, _ = self.model.rpn(batch, features)
            dets, _ = self.model.roi_heads(features, proposals, batch.image_sizes)
        d = dets[0]
        return {
            "boxes": d["boxes"].float().cpu().numpy(),
            "scores": d["scores"].float().cpu().numpy(),
            "labels": d["labels"].cpu().numpy(),
            "masks": d["masks"][:, 0].float().cpu().numpy(),
        }

    def __call__(self, image: np.ndarray) -> Detections:
        x, box = letterbox(image, self.size)
        r = self.raw(x)
        boxes = boxes_to_original(r["boxes"], box)
        masks = paste_masks(r["masks"], r["boxes"] / box.scale, box.orig_h, box.orig_w)
        return Detections(boxes, r["scores"], r["labels"], masks)


def evaluate_coco(predict: Predictor, data: CocoInstances, limit: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """COCO box and mask AP of ``predict`` on ``data`` (first ``limit`` images)."""
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    image_ids = data.image_ids[:limit] if limit else data.image_ids
    box_results, segm_results = [], []
    for i, image_id in enumerate(image_ids):
        det = predict(data.load_image(image_id))
        for j in range(len(det.scores)):
            x0, y0, x1, y1 = (float(v) for v in det.boxes[j])
            cat = data.label_to_cat.get(int(det.labels[j]))
            if cat is None:
                continue
            common = {"image_id": image_id, "category_id": cat, "score": float(det.scores[j])}
            box_results.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            rle = mask_utils.encode(np.asfortranarray((det.masks[j] > 0.5).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            segm_results.append({**common, "segmentation": rle})
        if progress:
            progress(i + 1, len(image_ids))
    metrics: dict[str, float] = {"images": float(len(image_ids))}
    for kind, results in (("box", box_results), ("mask", segm_results)):
        if not results:
            metrics.update({f"{kind}_ap": 0.0, f"{kind}_ap50": 0.0, f"{kind}_ap75": 0.0})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = data.coco.loadRes(results)
            ev = COCOeval(data.coco, dt, "bbox" if kind == "box" else "segm")
            ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[f"{kind}_ap"] = float(max(ev.stats[0], 0.0))
        metrics[f"{kind}_ap50"] = float(max(ev.stats[1], 0.0))
        metrics[f"{kind}_ap75"] = float(max(ev.stats[2], 0.0))
    return metrics
