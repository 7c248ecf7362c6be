"""Per-output tensor parity of a quantized (or converted) graph against its FP32 reference.

Each static graph is run twice on the same inputs - the FP32 reference and the candidate (INT8) -
and every output is compared over all samples together: cosine similarity, signal-to-noise ratio
in dB (reference power over error power), max and mean absolute difference, and the mean and
standard deviation of both, so a collapsed output (e.g. mask logits that all sit near 0, B08)
shows up as a spread that shrank even when the cosine looks acceptable. The result is plain data,
ready for the bundle manifest.

Two ways in: :func:`compare_graphs` takes two runner engines (``maskedge_runner.engine.Engine``,
any backend) and images - the inputs each graph gets are captured from the reference engine
running the images, then fed to both engines' graphs, so the candidate is judged on exactly the
reference's inputs; :func:`measure_parity` / :func:`measure_graph_parity` take ONNX files and
already captured inputs (the quantizer uses these on its calibration inputs).

Reads: the images, or the two ONNX files of each graph (``<dir>/models/<precision>/<graph>.onnx``).
Writes: nothing.

Known limits: metrics are over the inputs given (the calibration set's captured inputs, or a
validation sample) and say nothing about inputs outside them. SNR is capped at
:data:`SNR_CAP_DB` (an exact match would be infinite, which JSON cannot hold). Samples whose first
axis is empty (an image without detections gives the mask head no RoIs) are skipped and counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConversionError

log = logging.getLogger(__name__)

SNR_CAP_DB = 200.0

GraphRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def tensor_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine similarity, SNR (dB), max/mean abs difference and spreads of two same-shape arrays."""
    if reference.shape != candidate.shape:
        raise ConversionError(
            f"output shapes differ: reference {reference.shape} vs candidate {candidate.shape}; "
            "the two graphs do not compute the same thing"
        )
    ref = reference.astype(np.float64).ravel()
    cand = candidate.astype(np.float64).ravel()
    err = ref - cand
    ref_norm = float(np.linalg.norm(ref))
    cand_norm = float(np.linalg.norm(cand))
    if ref_norm == 0.0 and cand_norm == 0.0:
        cosine = 1.0
    elif ref_norm == 0.0 or cand_norm == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(ref, cand) / (ref_norm * cand_norm))
    signal = float(np.dot(ref, ref))
    noise = float(np.dot(err, err))
    if noise == 0.0:
        snr = SNR_CAP_DB
    elif signal == 0.0:
        snr = -SNR_CAP_DB
    else:
        snr = min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))
    return {
        "cosine": cosine,
        "snr_db": snr,
        "max_abs_diff": float(np.max(np.abs(err))) if err.size else 0.0,
        "mean_abs_diff": float(np.mean(np.abs(err))) if err.size else 0.0,
        "reference_mean": float(ref.mean()) if ref.size else 0.0,
        "reference_std": float(ref.std()) if ref.size else 0.0,
        "candidate_mean": float(cand.mean()) if cand.size else 0.0,
        "candidate_std": float(cand.std()) if cand.size else 0.0,
    }


def _is_empty(sample: Mapping[str, np.ndarray]) -> bool:
    return any(v.ndim > 0 and v.shape[0] == 0 for v in sample.values())


def compare_runs(
    reference: GraphRunner,
    candidate: GraphRunner,
    inputs: Sequence[Mapping[str, np.ndarray]],
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Run both graphs on ``inputs`` and compare every output over all samples together.

    Returns ``{"samples", "skipped_empty", "outputs": {name: metrics + "min_sample_cosine"},
    "min_cosine", "min_snr_db"}``.
    """
    usable = [s for s in inputs if not _is_empty(s)]
    skipped = len(inputs) - len(usable)
    if max_samples is not None:
        usable = usable[:max_samples]
    if not usable:
        raise ConversionError(
            f"no non-empty inputs to compare on ({len(inputs)} given, {skipped} empty); "
            "calibrate on images where the model finds objects"
        )
    refs: dict[str, list[np.ndarray]] = {}
    cands: dict[str, list[np.ndarray]] = {}
    sample_cosines: dict[str, list[float]] = {}
    for sample in usable:
        feeds = {k: np.ascontiguousarray(v) for k, v in sample.items()}
        ref_out = reference(feeds)
        cand_out = candidate(feeds)
        missing = sorted(set(ref_out) - set(cand_out))
        if missing:
            raise ConversionError(f"candidate graph lacks outputs {missing} of the reference")
        for name, value in ref_out.items():
            refs.setdefault(name, []).append(value)
            cands.setdefault(name, []).append(cand_out[name])
            sample_cosines.setdefault(name, []).append(
                tensor_metrics(value, cand_out[name])["cosine"]
            )
    outputs = {}
    for name in refs:
        metrics = tensor_metrics(
            np.concatenate([r.ravel() for r in refs[name]]),
            np.concatenate([c.ravel() for c in cands[name]]),
        )
        metrics["min_sample_cosine"] = float(min(sample_cosines[name]))
        outputs[name] = metrics
    return {
        "samples": len(usable),
        "skipped_empty": skipped,
        "outputs": outputs,
        "min_cosine": min(m["cosine"] for m in outputs.values()),
        "min_snr_db": min(m["snr_db"] for m in outputs.values()),
    }


def ort_runner(path: Path, options: Mapping[str, Any] | None = None) -> GraphRunner:
    """The runner's ONNX Runtime backend on ``path`` (CPU, one thread unless ``options`` say)."""
    from maskedge_runner.backends import RunnerError, make_backend

    opts = {"intra_op_num_threads": 1, "providers": ["CPUExecutionProvider"], **(options or {})}
    try:
        return make_backend("onnxruntime", path, opts)
    except RunnerError as err:
        raise ConversionError(str(err)) from err


def measure_graph_parity(
    reference_model: Path,
    candidate_model: Path,
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    max_samples: int | None = None,
    load: Callable[[Path], GraphRunner] = ort_runner,
) -> dict[str, Any]:
    """Per-output metrics of ``candidate_model`` against ``reference_model`` on ``inputs``."""
    result = compare_runs(
        load(Path(reference_model)), load(Path(candidate_model)), inputs, max_samples=max_samples
    )
    result["reference"] = str(reference_model)
    result["candidate"] = str(candidate_model)
    return result


def compare_graphs(
    reference: Any, candidate: Any, images: Sequence[np.ndarray], *, max_samples: int | None = 32
) -> dict[str, Any]:
    """Per-graph, per-output metrics of ``candidate``'s graphs against ``reference``'s.

    Both are :class:`maskedge_runner.engine.Engine` objects (e.g. the FP32 and INT8 graphs of a
    bundle). The inputs of every graph call are captured while ``reference`` runs ``images``;
    each graph of both engines then runs on those same inputs. Returns ``{"images", "graphs":
    {graph: compare_runs(...)}, "min_cosine", "min_snr_db"}``.
    """
    from calibration.sets import collect_graph_inputs

    inputs = collect_graph_inputs(reference, images, min_mask_rois=0)
    graphs = {}
    for graph, samples in inputs.items():
        if not samples:
            log.warning("parity: %s got no inputs from %d images; not compared", graph, len(images))
            continue
        graphs[graph] = compare_runs(
            reference.graphs[graph], candidate.graphs[graph], samples, max_samples=max_samples
        )
        log.info(
            "parity %s: min cosine %.4f, min SNR %.1f dB over %d samples",
            graph,
            graphs[graph]["min_cosine"],
            graphs[graph]["min_snr_db"],
            graphs[graph]["samples"],
        )
    return {
        "images": len(images),
        "graphs": graphs,
        "min_cosine": min(g["min_cosine"] for g in graphs.values()) if graphs else None,
        "min_snr_db": min(g["min_snr_db"] for g in graphs.values()) if graphs else None,
    }


def measure_parity(
    folder: Path,
    graph_inputs: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    *,
    reference: str = "fp32",
    candidate: str = "int8",
    max_samples: int | None = 32,
    load: Callable[[Path], GraphRunner] = ort_runner,
) -> dict[str, Any]:
    """Parity of every graph in ``folder/models/<candidate>`` against ``models/<reference>``.

    ``graph_inputs`` maps graph name -> input dicts (e.g. from
    :func:`calibration.collect_graph_inputs`). Returns ``{"reference", "candidate", "graphs":
    {graph: compare_runs(...)}, "min_cosine", "min_snr_db"}``.
    """
    folder = Path(folder)
    graphs: dict[str, Any] = {}
    for graph, inputs in graph_inputs.items():
        ref_path = folder / "models" / reference / f"{graph}.onnx"
        cand_path = folder / "models" / candidate / f"{graph}.onnx"
        for path in (ref_path, cand_path):
            if not path.is_file():
                raise ConversionError(f"{path}: graph not found; export/quantize it first")
        graphs[graph] = measure_graph_parity(
            ref_path, cand_path, inputs, max_samples=max_samples, load=load
        )
        log.info(
            "parity %s %s vs %s: min cosine %.4f, min SNR %.1f dB over %d samples",
            graph,
            candidate,
            reference,
            graphs[graph]["min_cosine"],
            graphs[graph]["min_snr_db"],
            graphs[graph]["samples"],
        )
    return {
        "reference": reference,
        "candidate": candidate,
        "graphs": graphs,
        "min_cosine": min(g["min_cosine"] for g in graphs.values()) if graphs else None,
        "min_snr_db": min(g["min_snr_db"] for g in graphs.values()) if graphs else None,
    }
