"""Test helper: the tiny random-weight student as a bundle folder, built once per test session.

Exporting and quantizing take tens of seconds on a small machine, so the calibration,
quantization and latency tests share one folder: ``graph_spec.json``, ``models/fp32`` from the
project's exporter, ``models/int8`` from the arm64 target's quantizer with the default profile's
settings, calibrated on graph inputs captured by the FP32 engine on the demo calib split, and one
demo image under ``samples/`` for the benchmark.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_BUILT: dict[str, TinyBundle] = {}


@dataclass
class TinyBundle:
    folder: Path
    inputs: dict[str, list[dict[str, np.ndarray]]]
    report: dict[str, Any]
    settings: Any


def tiny_bundle(model, tmp_path_factory, demo_data) -> TinyBundle:
    """Export, calibrate and quantize ``model`` once; later calls return the same folder."""
    if "tiny" in _BUILT:
        return _BUILT["tiny"]
    from calibration import calibration_set_from_coco, collect_graph_inputs
    from maskedge_runner.engine import Engine
    from pipeline.export import export_graphs
    from targets import get_target

    folder = tmp_path_factory.mktemp("tiny_bundle")
    export_graphs(model, folder, verify=False)
    split = demo_data["calib"]
    calib = calibration_set_from_coco(
        split / "annotations.json",
        split / "images",
        image_size=int(model.transform.min_size[0]),
        min_images=1,
    )
    engine = Engine.from_dir(folder, precision="fp32", runtime_options={"intra_op_num_threads": 1})
    inputs = collect_graph_inputs(engine, calib.images)
    target = get_target("arm64")
    settings = target.profile().quantization
    report = target.quantize(folder, folder, inputs, settings)
    (folder / "samples").mkdir()
    shutil.copy(calib.images[0].path, folder / "samples" / calib.images[0].path.name)
    _BUILT["tiny"] = TinyBundle(folder, inputs, report, settings)
    return _BUILT["tiny"]
