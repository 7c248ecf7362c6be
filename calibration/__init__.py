"""Calibration and evaluation image sets, their manifests, and the one preprocessing.

The preprocessing lives in :mod:`maskedge_runner.preprocess` (the device runner needs it without
the rest of maskedge) and is re-exported here, so calibration, parity and the runner can never
disagree: ``load_image`` reads any image file as RGB, ``letterbox`` makes the model input.
"""

from __future__ import annotations

from calibration.sets import (
    MIN_IMAGES,
    CalibrationImage,
    CalibrationSet,
    build_calibration_set,
    calibration_set_from_coco,
    calibration_set_from_folder,
    collect_graph_inputs,
    demo_calibration_set,
    graph_inputs_summary,
    preprocessing_spec,
)
from maskedge_runner.preprocess import (
    MEAN,
    STD,
    ImageReadError,
    Letterbox,
    boxes_to_original,
    letterbox,
    load_image,
    to_rgb,
)

__all__ = [
    "MEAN",
    "MIN_IMAGES",
    "STD",
    "CalibrationImage",
    "CalibrationSet",
    "ImageReadError",
    "Letterbox",
    "boxes_to_original",
    "build_calibration_set",
    "calibration_set_from_coco",
    "calibration_set_from_folder",
    "collect_graph_inputs",
    "demo_calibration_set",
    "graph_inputs_summary",
    "letterbox",
    "load_image",
    "preprocessing_spec",
    "to_rgb",
]
