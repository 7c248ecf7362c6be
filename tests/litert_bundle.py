"""Test helper: LiteRT (mobile target) bundles, built once per test session.

- :func:`tiny_litert_bundle`: the tiny random-weight student through the mobile target's quantizer
  (FP32 and full-integer INT8 ``.tflite`` with sidecars), calibrated on graph inputs captured by
  the FP32 engine on the demo calib split, one demo image under ``samples/`` and a manifest
  naming the ``litert`` runtime;
- :func:`litert_fp32_copy`: any exported bundle's FP32 graphs as FP32 ``.tflite`` with verified
  sidecars (no INT8), for backend-parametrized runner tests on a trained model.

Converting takes a minute or more on a small machine, so the results are cached by folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_BUILT: dict[str, Any] = {}


@dataclass
class LiteRtBundle:
    folder: Path
    export: Path
    inputs: dict[str, list[dict[str, np.ndarray]]]
    report: dict[str, Any]


def _capture(folder: Path, images) -> dict[str, list[dict[str, np.ndarray]]]:
    from calibration import collect_graph_inputs
    from maskedge_runner.engine import Engine

    engine = Engine.from_dir(
        folder, precision="fp32", backend="onnxruntime", runtime_options={"intra_op_num_threads": 1}
    )
    return collect_graph_inputs(engine, images)


def tiny_litert_bundle(model, tmp_path_factory, demo_data) -> LiteRtBundle:
    """Export the tiny student, convert it for the mobile target; later calls reuse it."""
    if "tiny" in _BUILT:
        return _BUILT["tiny"]
    from calibration import calibration_set_from_coco
    from pipeline.export import export_graphs
    from targets import get_target

    export = tmp_path_factory.mktemp("tiny_export")
    export_graphs(model, export, verify=False)
    split = demo_data["calib"]
    calib = calibration_set_from_coco(
        split / "annotations.json",
        split / "images",
        image_size=int(model.transform.min_size[0]),
        min_images=1,
    )
    inputs = _capture(export, calib.images)
    target = get_target("mobile")
    folder = tmp_path_factory.mktemp("tiny_litert")
    report = target.quantize(export, folder, inputs, target.profile().quantization)
    (folder / "samples").mkdir()
    shutil.copy(calib.images[0].path, folder / "samples" / calib.images[0].path.name)
    options = target.profile().runtime.to_backend_options()
    options["num_threads"] = 1
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "runtime": {"name": "litert", "options": options},
                "classes": [{"label": i, "name": f"class{i}", "category_id": i} for i in (1, 2, 3)],
            }
        )
    )
    _BUILT["tiny"] = LiteRtBundle(folder, export, inputs, report)
    return _BUILT["tiny"]


def litert_fp32_copy(bundle: Path, out: Path, images) -> Path:
    """``bundle``'s FP32 ONNX graphs, and beside them the same graphs as FP32 ``.tflite`` with
    their verified ``.io.json`` (calibration inputs captured on ``images``), in ``out``."""
    key = f"fp32:{bundle}"
    if key in _BUILT:
        return _BUILT[key]
    import tempfile

    from targets.mobile.tflite_convert import (
        bind_io,
        convert_tflite,
        head_rows,
        to_saved_model,
    )

    shutil.copytree(bundle, out, dirs_exist_ok=True)
    spec = json.loads((bundle / "graph_spec.json").read_text())
    inputs = _capture(bundle, images)
    models = out / "models" / "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        for graph in ("backbone", "box_head", "mask_head"):
            samples = [s for s in inputs[graph] if all(v.shape[0] for v in s.values())]
            rows = head_rows(graph, spec)
            saved, _ = to_saved_model(
                bundle / "models" / "fp32" / f"{graph}.onnx", Path(tmp), rows, samples
            )
            content = convert_tflite(saved, int8=False)
            io = bind_io(bundle / "models" / "fp32" / f"{graph}.onnx", content, samples, rows or 1)
            (models / f"{graph}.tflite").write_bytes(content)
            (models / f"{graph}.io.json").write_text(json.dumps({**io, "precision": "fp32"}))
    _BUILT[key] = out
    return out
