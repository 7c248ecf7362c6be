"""Host code between the static graphs, in numpy, with torchvision's semantics.

The deployed network is three static graphs (backbone+FPN+RPN head, box head, mask head); this
module is everything torchvision's ``MaskRCNN`` does around them at inference, re-implemented in
numpy so that a device needs no torch:

- anchors: ``AnchorGenerator`` (cell anchors rounded, one grid per FPN level, stride = input size
  // grid size);
- RPN proposals: ``RegionProposalNetwork.filter_proposals`` (per-level top-k on the logits,
  ``BoxCoder`` decoding with ``bbox_xform_clip``, sigmoid, clip, small-box removal, score
  threshold with ``>=``, NMS batched by level, post-NMS top-n);
- multi-scale RoIAlign: ``MultiScaleRoIAlign`` level mapping (``LevelMapper``, FPN eq. 1) and
  ``roi_align`` with ``aligned=False``, including the C++ kernel's zeroing of samples outside
  the feature map and the adaptive grid when ``sampling_ratio <= 0``;
- box post-processing: ``RoIHeads.postprocess_detections`` (softmax, per-class decoding, clip,
  background dropped, score threshold with ``>``, boxes narrower than 1e-2 dropped, NMS batched
  by class, top detections);
- masks: ``maskrcnn_inference`` (the mask of the predicted class, sigmoid) and
  ``paste_masks_in_image``: each 28x28 mask is padded by one pixel, its box expanded to match,
  the mask resized bilinearly (align_corners=False) to the integer box size and placed into the
  image, clipped at its edges.

Arithmetic is float32 in the same order as torchvision wherever that decides a result (box
decoding, sample positions, IoU); the NMS kernel's comparison of a float IoU with a double
threshold is reproduced exactly. Known differences, all at the level of float32 rounding:
RoIAlign is computed as two matrix products (separable bilinear weights), so its sums are
reordered (~1e-6 relative); ``exp``/``log2``/``sqrt`` come from numpy rather than torch's
vectorised math library (an ulp at most); ties in top-k selection may be broken differently from
``torch.topk`` (they only occur on flat, e.g. constant, images), and detections whose scores are
within an ulp may come out in the other order.

Speed: everything is vectorised; the only Python loops run over FPN levels, over chunks of
``ROI_CHUNK`` RoIs, over *kept* boxes in NMS (stopped as soon as the top-n are kept) and over
detections when pasting masks. RoIAlign touches only each RoI's window of the feature map. The
matrix products are small: run numpy's BLAS single-threaded (``OPENBLAS_NUM_THREADS=1``, as the
command line does), or its idle threads busy-wait and slow down the runtime's own threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# torchvision's constants that are not attributes of the model
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
BOX_MIN_SIZE = 1e-2  # RoIHeads.postprocess_detections: remove_small_boxes(boxes, min_size=1e-2)
LEVEL_MAPPER_EPS = 1e-6
# torchvision.ops.batched_nms on CPU: per-class NMS above this many box coordinates, the
# coordinate-offset trick at or below it
BATCHED_NMS_VANILLA_ABOVE = 4000
# RoIs pooled together in one pair of matrix products (see roi_align)
ROI_CHUNK = 32


# ---------------------------------------------------------------------------------------------
# anchors


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred anchors (A,4) of one level, ``AnchorGenerator.generate_anchors``."""
    scales = np.asarray(sizes, dtype=np.float32)
    ratios = np.asarray(aspect_ratios, dtype=np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return np.round(base).astype(np.float32)


def grid_anchors(
    cell_anchors: np.ndarray, grid: tuple[int, int], stride: tuple[int, int]
) -> np.ndarray:
    """Anchors (H*W*A, 4) of one level, ordered (y, x, anchor) like torchvision's."""
    gh, gw = grid
    shifts_x = np.arange(gw, dtype=np.int32) * np.int32(stride[1])
    shifts_y = np.arange(gh, dtype=np.int32) * np.int32(stride[0])
    sy, sx = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    sx, sy = sx.reshape(-1), sy.reshape(-1)
    shifts = np.stack([sx, sy, sx, sy], axis=1).astype(np.float32)
    cells = np.asarray(cell_anchors, dtype=np.float32)
    return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# boxes


def decode_boxes(
    deltas: np.ndarray, boxes: np.ndarray, weights: Sequence[float], clip: float = BBOX_XFORM_CLIP
) -> np.ndarray:
    """``BoxCoder.decode_single``: deltas (N, 4K) relative to boxes (N,4) -> boxes (N, K, 4)."""
    deltas = np.asarray(deltas, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + np.float32(0.5) * widths
    ctr_y = boxes[:, 1] + np.float32(0.5) * heights
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = np.minimum(deltas[:, 2::4] / ww, np.float32(clip))
    dh = np.minimum(deltas[:, 3::4] / wh, np.float32(clip))
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    half_w = np.float32(0.5) * (np.exp(dw) * widths[:, None])
    half_h = np.float32(0.5) * (np.exp(dh) * heights[:, None])
    return np.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
        axis=2,
    )


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``clip_boxes_to_image`` for boxes (..., 4) xyxy."""
    out = np.empty_like(boxes)
    out[..., 0::2] = np.clip(boxes[..., 0::2], 0, width)
    out[..., 1::2] = np.clip(boxes[..., 1::2], 0, height)
    return out


def remove_small_boxes(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Indices of the boxes whose both sides are at least ``min_size``."""
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return np.flatnonzero((ws >= min_size) & (hs >= min_size))


def box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None
) -> np.ndarray:
    """Greedy NMS like ``torchvision.ops.nms``: kept indices (int64) by decreasing score.

    Scores are sorted stably (ties keep input order); a box is dropped when its IoU with a kept,
    higher-scoring box is greater than ``iou_threshold``. With ``max_keep`` the search stops once
    that many boxes are kept, which gives the same first ``max_keep`` indices as a full run.
    """
    n = int(scores.shape[0])
    if n == 0:
        return np.zeros((0,), dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float32)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[order, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    limit = n if max_keep is None else max(0, int(max_keep))
    threshold = _float32_below(iou_threshold)
    keep: list[int] = []
    remaining = np.arange(n)
    zero = np.float32(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        while remaining.size and len(keep) < limit:
            i = remaining[0]
            keep.append(int(i))
            rest = remaining[1:]
            w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            # not (iou > t): a NaN IoU (two empty boxes) suppresses nothing, as in the C++ kernel
            remaining = rest[~(iou > threshold)]
    return order[np.asarray(keep, dtype=np.int64)]


def _float32_below(value: float) -> np.float32:
    """The float32 ``t`` with ``x > t`` exactly when ``x > value`` for every float32 ``x``.

    The C++ NMS kernel compares its float IoU with the double threshold; this keeps that
    comparison in float32 without converting each IoU.
    """
    t = np.float32(value)
    if float(t) > value:
        t = np.nextafter(t, np.float32(-np.inf))
    return t


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    idxs: np.ndarray,
    iou_threshold: float,
    max_keep: int | None = None,
) -> np.ndarray:
    """``torchvision.ops.batched_nms`` (CPU): NMS that never suppresses across ``idxs``.

    Up to ``BATCHED_NMS_VANILLA_ABOVE`` coordinates the boxes of each index are offset so that
    they cannot overlap (torchvision's coordinate trick, same float32 offsets); above it each index
    runs its own NMS and the kept boxes are merged by score.
    """
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size <= BATCHED_NMS_VANILLA_ABOVE:
        offsets = idxs.astype(np.float32) * (boxes.max() + np.float32(1))
        return nms(boxes + offsets[:, None], scores, iou_threshold, max_keep)
    kept = []
    for value in np.unique(idxs):
        members = np.flatnonzero(idxs == value)
        kept.append(members[nms(boxes[members], scores[members], iou_threshold, max_keep)])
    keep = np.concatenate(kept)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return keep if max_keep is None else keep[:max_keep]


def topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, largest first (``torch.topk(sorted=True)``)."""
    n = values.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros((0,), dtype=np.int64)
    part = np.argpartition(-values, k - 1)[:k] if k < n else np.arange(n)
    return part[np.argsort(-values[part], kind="stable")]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``torch.sigmoid`` in float32: 1 / (1 + exp(-x)); exp overflow gives exactly 0."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return np.float32(1) / (np.float32(1) + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# RPN


def flatten_rpn_level(logits: np.ndarray, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One level's head outputs [1,A,H,W] and [1,4A,H,W] -> objectness (H*W*A,) and (H*W*A, 4),
    in the anchors' (y, x, anchor) order (torchvision's ``permute_and_flatten``)."""
    _, a, h, w = logits.shape
    objectness = logits[0].transpose(1, 2, 0).reshape(-1)
    box = deltas[0].reshape(a, 4, h, w).transpose(2, 3, 0, 1).reshape(-1, 4)
    return objectness, box


def rpn_proposals(
    logits: Sequence[np.ndarray],
    deltas: Sequence[np.ndarray],
    anchors: Sequence[np.ndarray],
    image_size: tuple[int, int],
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = BBOX_XFORM_CLIP,
) -> tuple[np.ndarray, np.ndarray]:
    """Proposals (P,4) float32 and their objectness probabilities (P,), best first.

    ``logits[i]``/``deltas[i]`` are level i's RPN head outputs, ``anchors[i]`` its anchors from
    :func:`grid_anchors`. Only the per-level top-k anchors are decoded: decoding is row-wise, so
    this gives the same boxes as decoding all of them first.
    """
    boxes_l, scores_l, levels_l = [], [], []
    for level, (lg, dl, anc) in enumerate(zip(logits, deltas, anchors, strict=True)):
        objectness, box_deltas = flatten_rpn_level(np.asarray(lg), np.asarray(dl))
        top = topk_indices(objectness, pre_nms_top_n)
        boxes_l.append(decode_boxes(box_deltas[top], anc[top], weights, clip)[:, 0])
        scores_l.append(objectness[top])
        levels_l.append(np.full(top.shape[0], level, dtype=np.int64))
    boxes = clip_boxes(np.concatenate(boxes_l), *image_size)
    scores = sigmoid(np.concatenate(scores_l))
    levels = np.concatenate(levels_l)

    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = np.flatnonzero(scores >= np.float32(score_thresh))
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = batched_nms(boxes, scores, levels, nms_thresh, max_keep=post_nms_top_n)
    return boxes[keep], scores[keep]


# ---------------------------------------------------------------------------------------------
# RoIAlign


def map_levels(
    boxes: np.ndarray,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    eps: float = LEVEL_MAPPER_EPS,
) -> np.ndarray:
    """``LevelMapper``: the pyramid level index (0 = finest pooled level) of each box."""
    s = np.sqrt(box_area(np.asarray(boxes, dtype=np.float32)))
    with np.errstate(divide="ignore"):
        lvl = np.floor(
            np.float32(canonical_level) + np.log2(s / np.float32(canonical_scale)) + np.float32(eps)
        )
    lvl = np.clip(lvl, k_min, k_max)
    return lvl.astype(np.int64) - k_min


def _axis_weights(
    start: np.ndarray, length: np.ndarray, pooled: int, grid: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Bilinear weights along one axis, averaged over each bin's samples, in a window.

    Returns weights (N, pooled, L), each RoI's window origin (N,) and the window length L shared
    by all N RoIs: sample ``i`` of bin ``p`` reads pixels ``origin + k`` with weight
    ``weights[:, p, k]``. Sample positions and corner weights follow torchvision's ``roi_align``
    CPU kernel with aligned=False: position ``start + p*bin + (i+0.5)*bin/grid``, a sample below
    -1 or above ``size`` contributes zero, positions are clamped at 0 and at the last pixel.
    """
    n = start.shape[0]
    bin_size = length / np.float32(pooled)
    p = np.arange(pooled, dtype=np.float32)
    i = np.arange(int(grid.max()), dtype=np.float32)
    grid_f = grid.astype(np.float32)
    pos = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + (
        (i[None, None, :] + np.float32(0.5)) * bin_size[:, None, None] / grid_f[:, None, None]
    )  # (N, P, G)
    valid = (pos >= -1.0) & (pos <= size) & (i[None, None, :] < grid_f[:, None, None])
    pos = np.maximum(pos, np.float32(0))
    low = pos.astype(np.int64)
    at_end = low >= size - 1
    low = np.where(at_end, size - 1, low)
    high = np.where(at_end, size - 1, low + 1)
    pos = np.where(at_end, low.astype(np.float32), pos)
    frac_high = pos - low.astype(np.float32)
    frac_low = np.where(valid, np.float32(1) - frac_high, np.float32(0))
    frac_high = np.where(valid, frac_high, np.float32(0))

    origin = low.reshape(n, -1).min(axis=1)
    extent = int((high.reshape(n, -1).max(axis=1) - origin).max()) + 1
    origin = np.minimum(origin, size - extent)  # keep the window inside the map
    k = np.arange(extent)
    local_low = (low - origin[:, None, None])[..., None] == k
    local_high = (high - origin[:, None, None])[..., None] == k
    weights = (frac_low[..., None] * local_low + frac_high[..., None] * local_high).sum(axis=2)
    return (weights / grid_f[:, None, None]).astype(np.float32), origin, extent


def _roi_align_hcw(
    feats_hcw: np.ndarray,
    boxes: np.ndarray,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> np.ndarray:
    """RoIAlign of boxes (N,4) on one map laid out (H, C, W) -> (N, PH, C, PW)."""
    h, c, w = feats_hcw.shape
    ph, pw = output_size
    n = boxes.shape[0]
    scale = np.float32(spatial_scale)
    start_x, start_y = boxes[:, 0] * scale, boxes[:, 1] * scale
    roi_w = np.maximum(boxes[:, 2] * scale - start_x, np.float32(1))
    roi_h = np.maximum(boxes[:, 3] * scale - start_y, np.float32(1))
    if sampling_ratio > 0:
        grid_y = grid_x = np.full(n, sampling_ratio, dtype=np.int64)
    else:
        grid_y = np.maximum(np.ceil(roi_h / np.float32(ph)), 1).astype(np.int64)
        grid_x = np.maximum(np.ceil(roi_w / np.float32(pw)), 1).astype(np.int64)
    wy, origin_y, len_y = _axis_weights(start_y, roi_h, ph, grid_y, h)  # (N, PH, Ly)
    wx, origin_x, len_x = _axis_weights(start_x, roi_w, pw, grid_x, w)  # (N, PW, Lx)

    # each RoI's window (Ly, C, Lx), then contract y and x with two batched matrix products
    windows = sliding_window_view(feats_hcw, len_x, axis=2)[
        origin_y[:, None] + np.arange(len_y), :, origin_x[:, None]
    ]  # (N, Ly, C, Lx)
    rows = np.matmul(wy, windows.reshape(n, len_y, c * len_x))  # (N, PH, C*Lx)
    out = np.matmul(rows.reshape(n, ph * c, len_x), wx.transpose(0, 2, 1))  # (N, PH*C, PW)
    return out.reshape(n, ph, c, pw)


def _roi_align_into(
    out: np.ndarray,
    rows: np.ndarray,
    features: np.ndarray,
    boxes: np.ndarray,
    spatial_scale: float,
    sampling_ratio: int,
) -> None:
    """RoIAlign ``boxes`` on ``features`` into ``out[rows]`` laid out (N, PH, C, PW), in chunks
    of RoIs of similar size (``ROI_CHUNK``) so that one large RoI does not widen every window."""
    feats_hcw = _to_hcw(features)
    ph, pw = out.shape[1], out.shape[3]
    extent = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    order = np.argsort(extent, kind="stable")
    for first in range(0, order.shape[0], ROI_CHUNK):
        idx = order[first : first + ROI_CHUNK]
        out[rows[idx]] = _roi_align_hcw(
            feats_hcw, boxes[idx], (ph, pw), spatial_scale, sampling_ratio
        )


def _to_hcw(features: np.ndarray) -> np.ndarray:
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim == 4:
        if feats.shape[0] != 1:
            raise ValueError(f"features of shape {feats.shape}: expected one image (1,C,H,W)")
        feats = feats[0]
    return np.ascontiguousarray(feats.transpose(1, 0, 2))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    return int(size[0]), int(size[1])


def roi_align(
    features: np.ndarray,
    boxes: np.ndarray,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
) -> np.ndarray:
    """``torchvision.ops.roi_align`` (aligned=False) of boxes (N,4) on one image's map (C,H,W)
    or (1,C,H,W) -> (N, C, PH, PW) float32.

    Bilinear sampling is separable: each RoI's output is ``Wy @ F @ Wx.T`` with weight matrices
    along y (PH, Ly) and x (PW, Lx) that already hold the average over the bin's samples, on the
    (Ly, Lx) window of the map the RoI touches, for a chunk of RoIs at once.
    """
    feats = np.asarray(features, dtype=np.float32)
    c = feats.shape[-3]
    ph, pw = _pair(output_size)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty((boxes.shape[0], ph, c, pw), dtype=np.float32)
    if boxes.shape[0]:
        rows = np.arange(boxes.shape[0])
        _roi_align_into(out, rows, feats, boxes, spatial_scale, sampling_ratio)
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3))


def multiscale_roi_align(
    features: Sequence[np.ndarray],
    boxes: np.ndarray,
    output_size: int | Sequence[int],
    sampling_ratio: int,
    scales: Sequence[float],
    canonical_scale: float = 224,
    canonical_level: int = 4,
) -> np.ndarray:
    """``MultiScaleRoIAlign`` for one image: each box pooled from its ``LevelMapper`` level.

    ``features`` are the pooled maps in the model's feature order, ``scales`` their spatial scales
    (1/stride, powers of two).
    """
    feats = [np.asarray(f, dtype=np.float32) for f in features]
    c = feats[0].shape[-3]
    ph, pw = _pair(output_size)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(feats) == 1:
        return roi_align(feats[0], boxes, (ph, pw), scales[0], sampling_ratio)
    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    levels = map_levels(boxes, k_min, k_max, canonical_scale, canonical_level)
    out = np.empty((boxes.shape[0], ph, c, pw), dtype=np.float32)
    for level, (feat, scale) in enumerate(zip(feats, scales, strict=True)):
        rows = np.flatnonzero(levels == level)
        if rows.size:
            _roi_align_into(out, rows, feat, boxes[rows], scale, sampling_ratio)
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3))


# ---------------------------------------------------------------------------------------------
# box and mask heads


def box_detections(
    class_logits: np.ndarray,
    box_deltas: np.ndarray,
    proposals: np.ndarray,
    image_size: tuple[int, int],
    *,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    clip: float = BBOX_XFORM_CLIP,
    min_size: float = BOX_MIN_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``RoIHeads.postprocess_detections`` for one image -> boxes (D,4), scores (D,), labels (D,).

    Every (proposal, foreground class) pair is a candidate; candidates above ``score_thresh``
    with both sides at least ``min_size`` go through NMS per class; the best
    ``detections_per_img`` are kept, best first.
    """
    num_classes = class_logits.shape[-1]
    boxes = clip_boxes(decode_boxes(box_deltas, proposals, weights, clip), *image_size)
    scores = softmax(class_logits)
    labels = np.broadcast_to(np.arange(num_classes, dtype=np.int64), scores.shape)
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)

    keep = np.flatnonzero(scores > np.float32(score_thresh))
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh, max_keep=detections_per_img)
    return boxes[keep], scores[keep], labels[keep]


def select_masks(mask_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``maskrcnn_inference``: logits (D,K,M,M) -> probabilities (D,M,M) of each label's class."""
    picked = mask_logits[np.arange(labels.shape[0]), labels]
    return sigmoid(picked)


# ---------------------------------------------------------------------------------------------
# masks in the image


def _resize_bilinear(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of a 2-D array, half-pixel centres (torch's align_corners=False)."""
    in_h, in_w = src.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
        pos = np.maximum(pos, 0.0)
        lo = np.minimum(pos.astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (pos - lo).astype(np.float32)
        return lo, hi, frac

    y0, y1, fy = axis(out_h, in_h)
    x0, x1, fx = axis(out_w, in_w)
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, im_h: int, im_w: int, padding: int = 1
) -> np.ndarray:
    """(N,M,M) mask probabilities and (N,4) xyxy boxes -> (N,im_h,im_w) float32 probabilities."""
    n, m = masks.shape[0], masks.shape[-1]
    out = np.zeros((n, im_h, im_w), dtype=np.float32)
    if n == 0:
        return out
    scale = float(m + 2 * padding) / m
    padded = np.pad(masks.astype(np.float32), ((0, 0), (padding, padding), (padding, padding)))
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    expanded = np.trunc(expanded.astype(np.float32)).astype(np.int64)
    for i in range(n):
        bx0, by0, bx1, by1 = (int(v) for v in expanded[i])
        w = max(bx1 - bx0 + 1, 1)
        h = max(by1 - by0 + 1, 1)
        x0, x1 = max(bx0, 0), min(bx1 + 1, im_w)
        y0, y1 = max(by0, 0), min(by1 + 1, im_h)
        if x1 <= x0 or y1 <= y0:
            continue
        resized = _resize_bilinear(padded[i], h, w)
        out[i, y0:y1, x0:x1] = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    return out
