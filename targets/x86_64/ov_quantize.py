"""OpenVINO IR conversion and NNCF INT8 post-training quantization of the static graphs.

For each graph in ``<fp32_dir>/models/fp32/`` (``backbone``, ``box_head``, ``mask_head``):

1. refuse ONNX graphs this target must never see, naming the ops found: QOperator-format or
   already quantized graphs (``com.microsoft`` ops such as ``QLinearConv``, ``QuantizeLinear``,
   ``ConvInteger``...) and data-dependent shapes (Loop, If, NonZero, TopK, ... - on a whole
   torchvision graph ``nncf.quantize`` fails inside If/Loop);
2. ``openvino.convert_model`` the FP32 ONNX graph and save it as FP32 IR (``compress_to_fp16``
   off), then check the IR against ONNX Runtime on the calibration inputs (max abs difference);
3. ``nncf.quantize`` the IR on the captured graph inputs through ``nncf.Dataset`` - the backbone
   on letterboxed calibration images, the heads on real pooled RoI features (re-batched to
   uniform batches of RoIs) - with the profile's preset (``performance``: symmetric activations,
   ``mixed``: asymmetric) and its IgnoredScope (``ignored_names`` / ``ignored_types`` /
   ``ignored_patterns``, OpenVINO op friendly names and type names). Every entry of the scope
   must match an op of some graph (NNCF's own matching, across the three graphs), or the build
   stops with a ConfigError listing what exists;
4. measure every output INT8 vs FP32 IR on the calibration inputs through the runner's OpenVINO
   backend (cosine, SNR), and write ``<out_dir>/models/{fp32,int8}/<graph>.xml`` + ``.bin``.

When ``ort_reference`` is on (the build's default), the same graphs are also quantized with
:func:`targets.ort_quantize.quantize_graphs` (QDQ, the profile's ONNX Runtime settings) into
``<out_dir>/reference/onnxruntime/``, so the build report can set ONNX Runtime beside OpenVINO
on the same calibration set.

Reads: ``<fp32_dir>/graph_spec.json`` and ``<fp32_dir>/models/fp32/*.onnx``.
Writes: ``<out_dir>/graph_spec.json``, ``<out_dir>/models/fp32/*.{xml,bin}``,
``<out_dir>/models/int8/*.{xml,bin}`` and, with ``ort_reference``,
``<out_dir>/reference/onnxruntime/``; each IR is saved in a temporary folder and moved into place.

Known limits: NNCF's own range estimators are used (its defaults for the preset); the profile's
``calibrate_method``, ``per_channel`` and activation/weight types configure only the ONNX Runtime
reference. OpenVINO quantizes the mask head's ConvTranspose to INT8 (ONNX Runtime leaves it in
float). NNCF's statistics collection runs the graphs with OpenVINO on the build host, so INT8
files can differ in the last bits between hosts with different ISAs.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import sha256_file
from pipeline.errors import ConfigError, ConversionError
from pipeline.parity import compare_runs, ort_runner
from targets.ort_quantize import DATA_DEPENDENT_OPS, GRAPH_ORDER, QUANTIZED_OPS, _uniform_batches
from targets.profiles import QuantizationSettings

log = logging.getLogger(__name__)

DEFAULT_PRESET = "performance"
PARITY_SAMPLES = 16
# the OpenVINO backend options quantization and parity run with (the build's own process)
CHECK_OPTIONS = {"inference_num_threads": 1, "inference_precision": "f32", "num_streams": 1}


def _all_nodes(graph: Any) -> list[Any]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                nodes.extend(_all_nodes(attr.g))
            for sub in attr.graphs:
                nodes.extend(_all_nodes(sub))
    return nodes


def check_convertible(path: Path) -> None:
    """Raise ConversionError if the ONNX graph at ``path`` is quantized or data-dependent."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError/ValueError/...
        raise ConversionError(f"{path}: not a readable ONNX model ({err})") from err
    nodes = _all_nodes(model.graph)
    foreign = Counter(f"{n.domain}:{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx"))
    quantized = Counter(n.op_type for n in nodes if n.op_type in QUANTIZED_OPS and not n.domain)
    if foreign or quantized:
        found = ", ".join(f"{op} x{k}" for op, k in sorted({**foreign, **quantized}.items()))
        raise ConversionError(
            f"{path}: is a quantized (QOperator/QDQ) or non-standard ONNX graph - unsupported ops "
            f"for the OpenVINO target: {found}. Give the FP32 graph from the export stage; this "
            "target quantizes it itself with NNCF"
        )
    dependent = Counter(n.op_type for n in nodes if n.op_type in DATA_DEPENDENT_OPS)
    if dependent:
        found = ", ".join(f"{op} x{k}" for op, k in sorted(dependent.items()))
        raise ConversionError(
            f"{path}: has data-dependent-shape ops ({found}); NNCF fails inside them. Quantize "
            "only the static graphs from the export stage (backbone, box_head, mask_head)"
        )


def _save_ir(model: Any, dst_xml: Path) -> None:
    """Save ``model`` as FP32 IR at ``dst_xml`` (+ .bin), via a temporary folder and renames."""
    import openvino as ov

    dst_xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst_xml.stem}-", dir=dst_xml.parent) as tmp:
        tmp_xml = Path(tmp) / dst_xml.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), dst_xml.with_suffix(".bin"))
        os.replace(tmp_xml, dst_xml)


def _ov_runner(path: Path) -> Any:
    from maskedge_runner.backends import RunnerError, make_backend

    try:
        return make_backend("openvino", path, CHECK_OPTIONS)
    except RunnerError as err:
        raise ConversionError(str(err)) from err


def convert_graph(onnx_path: Path, xml_path: Path) -> Any:
    """``openvino.convert_model`` one static ONNX graph and save it as FP32 IR; the ov.Model."""
    import openvino as ov

    check_convertible(onnx_path)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as err:  # OpenVINO raises OpConversionFailure/RuntimeError/...
        raise ConversionError(
            f"{onnx_path}: openvino.convert_model failed: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from err
    unnamed = [i for i, out in enumerate(model.outputs) if not out.get_names()]
    if unnamed:
        raise ConversionError(f"{onnx_path}: converted outputs {unnamed} lost their tensor names")
    _save_ir(model, xml_path)
    return model


def resolve_ignored_scope(
    settings: QuantizationSettings, models: Mapping[str, Any]
) -> dict[str, dict[str, list[str]]]:
    """Per graph, the IgnoredScope entries that match it; ConfigError if one matches nowhere.

    ``models`` maps graph names to ``openvino.Model``. Matching is NNCF's own, on NNCF's graphs of
    the models: names are OpenVINO op friendly names (the ONNX node names after conversion, e.g.
    ``/head/fc6/Gemm``), types OpenVINO op types (``Convolution``, ``ConvolutionBackpropData``,
    ``MatMul``...), patterns regular expressions matched at the start of an op name.
    """
    import nncf
    from nncf.openvino.graph.nncf_graph_builder import GraphConverter
    from nncf.scopes import get_matched_ignored_scope_info, validate_ignored_scope

    scope = nncf.IgnoredScope(names=list(settings.ignored_names),
                              types=list(settings.ignored_types),
                              patterns=list(settings.ignored_patterns), validate=True)
    graphs = {g: GraphConverter.create_nncf_graph(m) for g, m in models.items()}
    try:
        validate_ignored_scope(scope, list(graphs.values()))
    except nncf.ValidationError as err:
        nodes = [n for g in graphs.values() for n in g.get_all_nodes()
                 if n.node_type not in ("Constant", "Parameter", "Result")]
        examples = ", ".join(sorted({n.node_name for n in nodes})[:5])
        present = ", ".join(sorted({n.node_type for n in nodes}))
        raise ConfigError(
            f"quantization IgnoredScope (ignored_names/ignored_types/ignored_patterns of the "
            f"profile) matches nothing in {', '.join(models)}: "
            f"{' '.join(str(err).split())} Use OpenVINO op names of the converted graphs (e.g. "
            f"{examples}) or OpenVINO op types present ({present})"
        ) from err
    per_graph = {}
    for g, graph in graphs.items():
        matched, _ = get_matched_ignored_scope_info(scope, [graph])
        per_graph[g] = {"names": sorted(matched.names), "types": sorted(matched.types),
                        "patterns": sorted(matched.patterns)}
    return per_graph


def _nncf_quantize(model: Any, samples: list[dict[str, np.ndarray]], preset: str,
                   scope: Mapping[str, list[str]], graph: str) -> Any:
    import nncf

    batches = _uniform_batches(
        [{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in s.items()} for s in samples]
    )
    names = [port.any_name for port in model.inputs]
    dataset = nncf.Dataset(batches, lambda item: {n: item[n] for n in names})
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE,
               "mixed": nncf.QuantizationPreset.MIXED}
    ignored = nncf.IgnoredScope(names=list(scope["names"]), types=list(scope["types"]),
                                patterns=list(scope["patterns"]), validate=True)
    try:
        return nncf.quantize(
            model,
            dataset,
            preset=presets[preset],
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(batches),
            ignored_scope=ignored,
        )
    except nncf.ValidationError as err:
        raise ConfigError(f"{graph}: NNCF refused the IgnoredScope: {err}") from err
    except Exception as err:  # NNCF raises its own InternalError/RuntimeError/...
        raise ConversionError(
            f"{graph}: nncf.quantize failed: {type(err).__name__}: {err}"
        ) from err


def _op_counts(model: Any) -> dict[str, int]:
    skip = ("Constant", "Parameter", "Result")
    return dict(sorted(Counter(op.get_type_name() for op in model.get_ordered_ops()
                               if op.get_type_name() not in skip).items()))


def _quantized_compute(model: Any) -> dict[str, int]:
    """Compute ops (Convolution, ConvolutionBackpropData, MatMul...) fed by a FakeQuantize."""
    compute = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
    counts: Counter = Counter()
    for op in model.get_ordered_ops():
        if op.get_type_name() not in compute:
            continue
        sources = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        if any(s.get_type_name() == "FakeQuantize" for s in sources):
            counts[op.get_type_name()] += 1
    return dict(sorted(counts.items()))


def quantize_graphs(
    fp32_dir: Path,
    out_dir: Path,
    calibration_inputs: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    settings: QuantizationSettings = QuantizationSettings(),
    *,
    ort_reference: bool = True,
) -> dict[str, Any]:
    """FP32 and NNCF INT8 OpenVINO IR of the static graphs in ``fp32_dir``, in ``out_dir``.

    ``calibration_inputs`` maps each graph name to its captured input dicts (see
    :func:`calibration.collect_graph_inputs`). Returns the report: settings, versions, and per
    graph op counts, which compute ops were quantized, sizes, SHA-256, the IR-vs-ONNX conversion
    check, INT8-vs-FP32 parity, the IgnoredScope applied, and time.
    """
    import nncf
    import openvino as ov

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    models_dir = fp32_dir / "models" / "fp32"
    spec = fp32_dir / "graph_spec.json"
    if not spec.is_file():
        raise ConversionError(f"{spec}: graph spec not found; run the export stage first")
    found = sorted(p.stem for p in models_dir.glob("*.onnx"))
    if not found:
        raise ConversionError(f"{models_dir}: no FP32 graphs (*.onnx) to convert; export first")
    if settings.keep_float_nodes or settings.keep_float_op_types:
        raise ConfigError(
            "quantization.keep_float_nodes/keep_float_op_types are ONNX Runtime settings; the "
            "OpenVINO target keeps ops in float with ignored_names / ignored_types / "
            "ignored_patterns (OpenVINO op names and types)"
        )
    graphs = [g for g in GRAPH_ORDER if g in found] + [g for g in found if g not in GRAPH_ORDER]
    samples: dict[str, list[dict[str, np.ndarray]]] = {}
    for graph in graphs:
        given = [dict(s) for s in calibration_inputs.get(graph, ())]
        samples[graph] = [s for s in given if all(v.shape[0] > 0 for v in s.values())]
        if not samples[graph]:
            raise ConversionError(
                f"no usable calibration inputs for graph {graph} of {models_dir} ({len(given)} "
                "given, all empty or none); collect them with calibration.collect_graph_inputs "
                "on the FP32 engine, on images where the model finds objects"
            )
    preset = settings.preset or DEFAULT_PRESET

    t0 = time.perf_counter()
    log.info("converting %s to OpenVINO IR and quantizing with NNCF (preset %s)",
             ", ".join(graphs), preset)
    fp32_out, int8_out = out_dir / "models" / "fp32", out_dir / "models" / "int8"
    converted = {g: convert_graph(models_dir / f"{g}.onnx", fp32_out / f"{g}.xml")
                 for g in graphs}
    scopes = resolve_ignored_scope(settings, converted)
    reports: dict[str, Any] = {}
    for graph in graphs:
        started = time.perf_counter()
        onnx_path, fp32_xml, int8_xml = (models_dir / f"{graph}.onnx", fp32_out / f"{graph}.xml",
                                          int8_out / f"{graph}.xml")
        conversion = compare_runs(ort_runner(onnx_path), _ov_runner(fp32_xml), samples[graph],
                                  max_samples=4)
        quantized = _nncf_quantize(converted[graph], samples[graph], preset, scopes[graph], graph)
        _save_ir(quantized, int8_xml)
        parity = compare_runs(_ov_runner(fp32_xml), _ov_runner(int8_xml), samples[graph],
                              max_samples=PARITY_SAMPLES)

        def ir_bytes(xml: Path) -> int:
            return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size

        r = reports[graph] = {
            "graph": graph,
            "onnx_path": str(onnx_path),
            "fp32_ir": str(fp32_xml),
            "int8_ir": str(int8_xml),
            "onnx_bytes": onnx_path.stat().st_size,
            "fp32_bytes": ir_bytes(fp32_xml),
            "int8_bytes": ir_bytes(int8_xml),
            "sha256": {"xml": sha256_file(int8_xml), "bin": sha256_file(int8_xml.with_suffix(
                ".bin"))},
            "calibration_samples": len(samples[graph]),
            "calibration_rows": int(sum(next(iter(s.values())).shape[0]
                                        for s in samples[graph])),
            "op_counts_fp32": _op_counts(converted[graph]),
            "op_counts_int8": _op_counts(quantized),
            "quantized_compute": _quantized_compute(quantized),
            "fake_quantize": _op_counts(quantized).get("FakeQuantize", 0),
            "ignored_scope": scopes[graph],
            "conversion": {
                "against": "ONNX Runtime on the FP32 ONNX graph",
                "max_abs_diff": max(m["max_abs_diff"] for m in conversion["outputs"].values()),
                "min_cosine": conversion["min_cosine"],
                "samples": conversion["samples"],
            },
            "parity": parity,
            "seconds": round(time.perf_counter() - started, 2),
        }
        log.info("%s: IR %d -> INT8 %d bytes, %d FakeQuantize, conversion max|diff| %.2e, INT8 "
                 "min cosine %.4f, SNR %.1f dB, %.1fs", graph, r["fp32_bytes"], r["int8_bytes"],
                 r["fake_quantize"], r["conversion"]["max_abs_diff"], parity["min_cosine"],
                 parity["min_snr_db"], r["seconds"])
    if out_dir.resolve() != fp32_dir.resolve():
        shutil.copyfile(spec, out_dir / "graph_spec.json")

    reference = None
    if ort_reference:
        from targets.ort_quantize import quantize_graphs as ort_quantize_graphs

        ort_settings = settings.with_(preset=None, ignored_names=(), ignored_types=(),
                                      ignored_patterns=())
        ref_dir = out_dir / "reference" / "onnxruntime"
        ref = ort_quantize_graphs(fp32_dir, ref_dir, calibration_inputs, ort_settings)
        reference = {"out_dir": str(ref_dir), "min_cosine": ref["min_cosine"],
                     "settings": ref["settings"], "seconds": ref["seconds"],
                     "graphs": {g: {"parity_min_cosine": r["parity"]["min_cosine"],
                                    "kept_float": r["kept_float"]}
                                for g, r in ref["graphs"].items()}}

    seconds = round(time.perf_counter() - t0, 2)
    log.info("converted and quantized %d graphs in %.1fs -> %s", len(graphs), seconds, int8_out)
    return {
        "format": "OpenVINO IR (FakeQuantize INT8)",
        "quantizer": "nncf.quantize",
        "preset": preset,
        "settings": settings.to_dict(),
        "versions": {"openvino": ov.__version__, "nncf": nncf.__version__},
        "host_machine": platform.machine(),
        "graphs": reports,
        "min_cosine": min(r["parity"]["min_cosine"] for r in reports.values()),
        "conversion_max_abs_diff": max(r["conversion"]["max_abs_diff"]
                                       for r in reports.values()),
        "onnxruntime_reference": reference,
        "limitations": _limitations(reports),
        "out_dir": str(out_dir),
        "seconds": seconds,
    }


def _limitations(reports: Mapping[str, Any]) -> list[str]:
    """What a user of these INT8 IRs should know, in words, for the manifest."""
    notes = ["OpenVINO INT8 uses NNCF's range estimators for the preset; the profile's "
             "calibrate_method and activation/weight types apply to the ONNX Runtime reference "
             "only."]
    for graph, r in reports.items():
        scope = r["ignored_scope"]
        kept = scope["names"] + scope["types"] + scope["patterns"]
        if kept:
            notes.append(f"{graph}: kept in float by the profile's IgnoredScope: "
                         + ", ".join(kept))
    return notes
