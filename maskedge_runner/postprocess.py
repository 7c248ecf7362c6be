"""Host code between the static graphs, in numpy, with torchvision's semantics.

Mask pasting mirrors ``torchvision.models.detection.roi_heads.paste_masks_in_image``: each 28x28
mask is padded by one pixel, its box expanded to match, the mask resized bilinearly
(align_corners=False) to the integer box size and placed into the image, clipped at its edges.
"""

from __future__ import annotations

import numpy as np


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


def paste_masks(masks: np.ndarray, boxes: np.ndarray, im_h: int, im_w: int,
                padding: int = 1) -> np.ndarray:
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
