"""The result type the runner returns, numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Detections:
    """One image's results in original image coordinates.

    boxes (N,4) float32 xyxy, scores (N,) float32, labels (N,) int64 (contiguous training labels,
    1..K; the manifest maps them to class names and the user's category ids), masks (N,H,W)
    float32 probabilities (threshold at 0.5 for a binary mask).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    @classmethod
    def empty(cls, height: int, width: int) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                   np.zeros((0,), np.int64), np.zeros((0, height, width), np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])
