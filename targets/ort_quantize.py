"""ONNX Runtime QDQ INT8 post-training quantization of the static deployment graphs.

For each graph in ``<fp32_dir>/models/fp32/`` (``backbone``, ``box_head``, ``mask_head``):

1. refuse graphs the quantizer must never see: data-dependent shapes (Loop, If, NonZero, TopK,
   ScatterElements, ... - B07) or graphs that are already quantized (QOperator/QDQ ops),
   naming the ops found;
2. ``quant_pre_process`` (symbolic shape inference + ORT basic optimisation);
3. calibrate with the profile's method (MinMax, Entropy, Percentile; ORT's calibrators, run in
   chunks) on the *captured* graph inputs - the backbone on letterboxed calibration images, the
   heads on real pooled RoI features - and ``quantize_static`` in QDQ format from those ranges
   with the profile's activation/weight types and per-channel setting. Under entropy or
   percentile the graph *outputs* keep the min-max range the data reached
   (``output_ranges: "minmax"``, the default; see :func:`_output_ranges_minmax`): the host code
   decides on their tails;
4. measure every output INT8 vs FP32 on the calibration inputs (cosine, SNR); when a graph's
   lowest output cosine is below ``min_output_cosine``, rank its layers by the noise each one
   adds (activations collected with ORT's QDQ debugging tools) and keep the worst in float -
   1, 2, 4, ... of them, each with the nodes around the activation it reads (see
   :func:`float_island`), at most ``max_float_layers`` layers and ``search_seconds`` - until the
   threshold is met. The threshold is never lowered; float layers that neither meet it nor
   halve the distance to a cosine of 1 are not kept, and a graph that still misses it is
   reported (the parity gate decides the build);
5. write ``<out_dir>/models/int8/<graph>.onnx`` atomically (temp file, then ``os.replace``) and
   copy ``graph_spec.json``.

Reads: ``<fp32_dir>/graph_spec.json`` and ``<fp32_dir>/models/fp32/*.onnx``.
Writes: ``<out_dir>/graph_spec.json`` and ``<out_dir>/models/int8/*.onnx``; nothing else (the
work happens in a temporary folder inside ``out_dir``, removed afterwards).

Determinism: the same graphs, inputs and settings give byte-identical INT8 files (calibration
statistics and the QDQ rewrite are deterministic). The only exception is the sensitive-layer
search stopping on ``search_seconds`` instead of ``max_float_layers``; the report says when.

Known limits: ONNX Runtime's CPU provider has no INT8 kernel for ConvTranspose (the mask head's
upsampling), so the Q/DQ pair around it runs in float; the report lists, per graph, which ops the
build host's ORT fuses into INT8 kernels and which compute stays in float (fusions depend on the
platform: on x86 ORT fuses far fewer Conv with int8 activations than with uint8 ones, which is
why the shipped profiles use uint8 activations). Entropy calibration is slow (ORT searches the
KL threshold in Python, tensor by tensor: about half a minute for a MobileNet backbone here).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import sha256_file
from pipeline.errors import ConfigError, ConversionError
from pipeline.parity import measure_graph_parity
from targets.profiles import QuantizationSettings

log = logging.getLogger(__name__)

GRAPH_ORDER = ("backbone", "box_head", "mask_head")
DATA_DEPENDENT_OPS = frozenset(
    {
        "Loop",
        "If",
        "Scan",
        "NonZero",
        "TopK",
        "NonMaxSuppression",
        "Unique",
        "Compress",
        "ScatterElements",
        "ScatterND",
        "Scatter",
        "Range",
        "SequenceConstruct",
        "SequenceAt",
        "SequenceInsert",
        "SplitToSequence",
        "ConcatFromSequence",
    }
)
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearSoftmax",
        "QAttention",
        "DynamicQuantizeMatMul",
    }
)
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
PASS_THROUGH_OPS = frozenset(
    {
        "Relu",
        "Clip",
        "LeakyRelu",
        "HardSigmoid",
        "HardSwish",
        "Sigmoid",
        "MaxPool",
        "AveragePool",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Resize",
        "Pad",
        "Identity",
    }
)
SHAPE_OPS = frozenset({"Shape", "Gather", "Size", "ConstantOfShape", "Range", "NonZero"})
PARITY_SAMPLES = 16
CALIBRATION_CHUNK = 8
HEAD_BATCH = 32  # RoIs per calibration batch of a head graph (see _uniform_batches)
ENTROPY_BINS = 512
ENTROPY_QUANTIZED_BINS = 128
SENSITIVITY_SAMPLES = 4
DB_CAP = 100.0


def _uniform_batches(samples: list[dict[str, np.ndarray]],
                     size: int = HEAD_BATCH) -> list[dict[str, np.ndarray]]:
    """Re-batch head inputs whose first axis (RoIs, detections) varies from image to image.

    ORT's histogram calibrators (entropy, percentile) stack each tensor's outputs across runs and
    fail on ragged first axes, so samples are concatenated and cut into batches of ``size``; the
    last batch wraps around to the first rows. Samples of one shape are returned as they are.
    """
    if len(samples) < 2 or len({tuple(v.shape[0] for v in s.values()) for s in samples}) < 2:
        return samples
    keys = list(samples[0])
    stacked = {k: np.concatenate([s[k] for s in samples if s[k].shape[0]], axis=0) for k in keys}
    total = next(iter(stacked.values())).shape[0]
    if total == 0:
        return samples[:1]
    size = min(size, total)
    batches = []
    for start in range(0, total, size):
        idx = np.arange(start, start + size) % total
        batches.append({k: np.ascontiguousarray(v[idx]) for k, v in stacked.items()})
    return batches


class GraphInputs:
    """An ONNX Runtime ``CalibrationDataReader`` over captured input dicts (rewindable)."""

    def __init__(self, samples: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.samples = _uniform_batches([
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in s.items()} for s in samples
        ])
        self.start, self.end, self.pos = 0, len(self.samples), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start + self.pos >= self.end:
            return None
        self.pos += 1
        return self.samples[self.start + self.pos - 1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item

    def __len__(self) -> int:
        return len(self.samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, end_index, 0

    def rewind(self) -> None:
        self.set_range(0, len(self.samples))


def _links(nodes: Sequence[Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Tensor name -> the node producing it, and tensor name -> the nodes reading it."""
    producer = {out: n for n in nodes for out in n.output}
    readers: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    return producer, readers


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Every node, including those inside subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def check_quantizable(model: Any, path: Path) -> None:
    """Raise ConversionError if ``model`` has data-dependent shapes or is already quantized."""
    counts = Counter(n.op_type for n in _all_nodes(model.graph))
    dependent = {op: n for op, n in counts.items() if op in DATA_DEPENDENT_OPS}
    if dependent:
        found = ", ".join(f"{op} x{n}" for op, n in sorted(dependent.items()))
        raise ConversionError(
            f"{path}: has data-dependent-shape ops ({found}); ONNX Runtime's quantizer cannot "
            "handle them (shape inference fails, Q/DQ lands on index tensors). Quantize only the "
            "static graphs from the export stage (backbone, box_head, mask_head), not a whole "
            "detection model"
        )
    quantized = {op: n for op, n in counts.items() if op in QUANTIZED_OPS}
    foreign = sorted(
        {
            f"{n.domain}:{n.op_type}"
            for n in _all_nodes(model.graph)
            if n.domain not in ("", "ai.onnx")
        }
    )
    if quantized or foreign:
        found = ", ".join([f"{op} x{n}" for op, n in sorted(quantized.items())] + foreign)
        raise ConversionError(
            f"{path}: is already quantized or uses non-standard ops ({found}); give the FP32 "
            "graph from the export stage"
        )


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy to a temporary name beside ``dst``, then rename: ``dst`` is never half-written."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _quant_types(settings: QuantizationSettings) -> tuple[Any, Any]:
    from onnxruntime.quantization import QuantType

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    return types[settings.activation_type], types[settings.weight_type]


def _calibration_method(settings: QuantizationSettings) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings.calibrate_method]


def _preprocess(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_optimization=False)
    except Exception as err:  # ORT's pre-processing raises bare Exceptions/AssertionErrors
        raise ConversionError(
            f"{src}: quant_pre_process (shape inference + optimisation) failed: "
            f"{type(err).__name__}: {err}"
        ) from err


def _method_file(cache: Path) -> Path:
    return cache.with_name(cache.name + ".method")


def _calibrate(
    src: Path, reader: GraphInputs, settings: QuantizationSettings, cache: Path, work: Path
) -> None:
    """Tensor ranges of ``src`` on the captured inputs, saved where quantize_static reads them.

    Calibration runs here rather than inside ``quantize_static`` for two reasons: it goes in
    chunks of at most CALIBRATION_CHUNK samples (statistics merged), so memory stays bounded
    however large the calibration set; and the entropy calibrator gets a real histogram
    (``quantize_static`` cannot pass bin counts, and with its default 128/128 bins the KL search
    has a single candidate, so "entropy" silently equals min-max).
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    extra: dict[str, Any] = {}
    if settings.calibrate_method == "entropy":
        extra = {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS}
    elif settings.calibrate_method == "percentile":
        extra = {"percentile": settings.percentile}
    try:
        calibrator = create_calibrator(
            src,
            None,
            augmented_model_path=str(work / "augmented.onnx"),
            calibrate_method=_calibration_method(settings),
            extra_options=extra,
        )
        # ORT's histogram calibrators print progress and bin counts to stdout: keep them in the
        # debug log
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            for start in range(0, len(reader), CALIBRATION_CHUNK):
                reader.set_range(start, min(start + CALIBRATION_CHUNK, len(reader)))
                calibrator.collect_data(reader)
            ranges = calibrator.compute_data()
        if printed.getvalue().strip():
            log.debug("onnxruntime calibrator: %s", " ".join(printed.getvalue().split()))
        if settings.calibrate_method != "minmax" and settings.output_ranges == "minmax":
            kept = _output_ranges_minmax(src, calibrator, ranges)
            log.debug("%s: outputs with min-max ranges: %s", src.name, ", ".join(kept))
        save_tensors_data(ranges, cache)
        _method_file(cache).write_text(settings.calibrate_method)
    except ValueError as err:
        # numpy's histogram refuses a tensor whose whole range is one value (a dead channel, a
        # constant output): histogram methods cannot work there, min-max ranges can
        if "bins" not in str(err) or settings.calibrate_method == "minmax":
            raise ConversionError(
                f"{src}: calibration ({settings.calibrate_method}) failed: ValueError: {err}"
            ) from err
        log.warning("%s: %s calibration failed on a degenerate tensor range (%s); this graph is "
                    "calibrated with minmax", src.name, settings.calibrate_method, err)
        reader.rewind()
        _calibrate(src, reader, settings.with_(calibrate_method="minmax"), cache, work)
    except Exception as err:  # ORT raises RuntimeError/its own Fail types
        raise ConversionError(
            f"{src}: calibration ({settings.calibrate_method}) failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        (work / "augmented.onnx").unlink(missing_ok=True)
        reader.rewind()


def _output_ranges_minmax(src: Path, calibrator: Any, ranges: Any) -> list[str]:
    """Give the graph's outputs the min-max range the histogram calibrator saw.

    The outputs of the static graphs are what the host code decides on: RPN logits and box
    deltas, FPN features pooled by RoIAlign, class scores, mask logits. A histogram method
    (entropy, percentile) clips their tails - the strongest objectness, the largest deltas, the
    peak feature responses - and on the demo student entropy ranges on the backbone's outputs
    left 3.5 % of the val images without any detection that FP32 found (gate B09). The inner
    activations keep the histogram method's ranges. Returns the outputs changed.
    """
    import onnx
    from onnxruntime.quantization.calibrate import TensorData

    histograms = calibrator.collector.histogram_dict
    changed = []
    for output in onnx.load(str(src), load_external_data=False).graph.output:
        name = output.name
        if name in histograms and name in ranges:
            lowest, highest = histograms[name][2], histograms[name][3]
            ranges[name] = TensorData(lowest=np.asarray(lowest, np.float32),
                                      highest=np.asarray(highest, np.float32))
            changed.append(name)
    return changed


def _quantize(
    src: Path,
    dst: Path,
    reader: GraphInputs,
    settings: QuantizationSettings,
    exclude: Sequence[str],
    cache: Path,
) -> None:
    """QDQ-quantize ``src`` into ``dst`` with the ranges in ``cache`` (calibrated on first use)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    if not cache.is_file():
        _calibrate(src, reader, settings, cache, cache.parent)
    if _method_file(cache).is_file():  # the method that made the ranges (a fallback may differ)
        settings = settings.with_(calibrate_method=_method_file(cache).read_text())
    activation_type, weight_type = _quant_types(settings)
    try:
        quantize_static(
            str(src),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=activation_type,
            weight_type=weight_type,
            nodes_to_exclude=list(exclude),
            calibrate_method=_calibration_method(settings),
            extra_options={"ActivationSymmetric": settings.activation_symmetric},
            calibration_cache_path=str(cache),
        )
    except Exception as err:  # ORT raises ValueError/RuntimeError/its own Fail types
        raise ConversionError(
            f"{src}: quantize_static failed: {type(err).__name__}: {err}"
        ) from err


def describe_qdq(path: Path) -> dict[str, Any]:
    """Op counts of a QDQ graph and which ops are wrapped in Q/DQ (structure only)."""
    import onnx

    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    produced_by, consumers = _links(nodes)
    counts = Counter(n.op_type for n in nodes)
    wrapped: Counter = Counter()
    float_ops: Counter = Counter()
    on_shape_ops = []
    for n in nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fed = any(
            produced_by.get(i) is not None and produced_by[i].op_type == "DequantizeLinear"
            for i in n.input[:1]
        )
        if fed and n.op_type in SHAPE_OPS:
            on_shape_ops.append(n.name or n.op_type)
        outs_q = all(
            any(c.op_type == "QuantizeLinear" for c in consumers.get(o, [])) for o in n.output
        )
        if fed and (outs_q or n.op_type in COMPUTE_OPS):
            wrapped[n.op_type] += 1
        else:
            float_ops[n.op_type] += 1
    return {
        "op_counts": dict(sorted(counts.items())),
        "quantize_linear": counts.get("QuantizeLinear", 0),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
        "qdq_wrapped_op_types": dict(sorted(wrapped.items())),
        "float_op_types": dict(sorted(float_ops.items())),
        "qdq_on_shape_ops": on_shape_ops,
    }


def describe_ort_kernels(path: Path) -> dict[str, Any]:
    """What this host's ONNX Runtime CPU provider runs: the graph after its QDQ fusions.

    Fusions depend on the platform's kernels (e.g. x86 ORT fuses far fewer Conv with signed
    8-bit activations than with unsigned ones), so this describes the build host's ORT.

    ``int8_kernels`` counts fused integer ops (QLinearConv, QGemm, ...); ``float_compute`` counts
    Conv/ConvTranspose/Gemm/MatMul left in float (e.g. ConvTranspose between DQ and Q).
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized)
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(optimized))
    counts = Counter(n.op_type for n in model.graph.node)
    int8 = {
        op: n
        for op, n in counts.items()
        if op.startswith("QLinear")
        or op in ("QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")
    }
    return {
        "int8_kernels": dict(sorted(int8.items())),
        "float_compute": {
            op: n
            for op, n in sorted(counts.items())
            if op in COMPUTE_OPS or op in ("FusedConv", "FusedGemm")
        },
    }


def float_island(node: Any, nodes: Sequence[Any]) -> list[str]:
    """The nodes to exclude so that ``node`` and the activation it reads stay in float.

    In QDQ format a tensor is quantized when any node next to it is (a Conv quantizes its input
    and its output), so excluding one Conv only keeps its weights in float. To keep its input
    activation in float too, the island also takes the node that produces that activation, every
    other node reading it, and - through pass-through ops (Relu, Clip, pooling, reshapes, ...) -
    the path back to the previous compute node, with all readers along the way.
    """
    producer, readers = _links(nodes)
    island = {node.name}
    tensor = node.input[0]
    while True:
        island.update(r.name for r in readers.get(tensor, []))
        src = producer.get(tensor)
        if src is None:
            break
        island.add(src.name)
        if src.op_type not in PASS_THROUGH_OPS:
            break
        tensor = src.input[0]
    return sorted(island)


def _rank_sensitive_nodes(
    float_model: Path,
    qdq_model: Path,
    inputs: Sequence[Mapping[str, np.ndarray]],
    candidates: Sequence[Any],
    all_nodes: Sequence[Any],
    tmp: Path,
) -> list[dict[str, Any]]:
    """Candidate nodes ordered by the quantization noise each adds (INT8 vs FP32 activations).

    For a node, ``added_noise`` is its output's relative noise power (error power over signal
    power, INT8 model vs FP32 model) minus that of its input: what the node's own weight and
    activation rounding contributed, in linear terms so that an early layer going from exact to
    40 dB does not outrank a late one going from 24 to 22 dB.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        modify_model_output_intermediate_tensors,
    )

    acts = {}
    for tag, model in (("float", float_model), ("qdq", qdq_model)):
        augmented = tmp / f"augmented_{tag}.onnx"
        modify_model_output_intermediate_tensors(str(model), str(augmented))
        acts[tag] = collect_activations(str(augmented), GraphInputs(inputs))
        augmented.unlink()

    _, readers = _links(all_nodes)

    def sqnr_db(name: str) -> float | None:
        # the quantizer removes a Relu/Clip after a Conv and renames the Conv's output; follow a
        # single pass-through reader to the name that exists in both models
        while name not in acts["float"] or name not in acts["qdq"]:
            nxt = readers.get(name, [])
            if len(nxt) != 1 or nxt[0].op_type not in PASS_THROUGH_OPS:
                return None
            name = nxt[0].output[0]
        value = compute_signal_to_quantization_noice_ratio(acts["float"][name], acts["qdq"][name])
        return min(value, DB_CAP)

    ranked = []
    for node in candidates:
        out_db = sqnr_db(node.output[0])
        if out_db is None:
            continue
        in_db = sqnr_db(node.input[0])
        in_db = DB_CAP if in_db is None else in_db
        added = 10.0 ** (-out_db / 10.0) - 10.0 ** (-in_db / 10.0)
        ranked.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "input_sqnr_db": round(in_db, 2),
                "output_sqnr_db": round(out_db, 2),
                "added_noise": float(f"{added:.4g}"),
            }
        )
    ranked.sort(key=lambda r: (-r["added_noise"], r["node"]))
    return ranked


@dataclass
class _Prepared:
    """One graph after the checks and ``quant_pre_process``, before quantization."""

    graph: str
    fp32_path: Path
    pre_path: Path
    samples: list[dict[str, np.ndarray]]
    nodes: list[Any]
    fp32_counts: Counter
    keep_float: list[str]


def _prepare(
    graph: str,
    fp32_path: Path,
    samples: list[dict[str, np.ndarray]],
    settings: QuantizationSettings,
    work: Path,
) -> _Prepared:
    import onnx

    model = onnx.load(str(fp32_path))
    check_quantizable(model, fp32_path)
    fp32_counts = Counter(n.op_type for n in model.graph.node)
    del model
    pre = work / f"{graph}.pre.onnx"
    _preprocess(fp32_path, pre)
    nodes = list(onnx.load(str(pre), load_external_data=False).graph.node)
    keep = [
        n.name
        for n in nodes
        if n.name in settings.keep_float_nodes or n.op_type in settings.keep_float_op_types
    ]
    return _Prepared(graph, fp32_path, pre, samples, nodes, fp32_counts, keep)


def _quantize_prepared(
    p: _Prepared, final_path: Path, settings: QuantizationSettings, work: Path
) -> dict[str, Any]:
    t0 = time.perf_counter()
    cache = work / f"{p.graph}.calibration.json"
    candidate = work / f"{p.graph}.int8.onnx"
    _quantize(p.pre_path, candidate, GraphInputs(p.samples), settings, p.keep_float, cache)
    parity = measure_graph_parity(p.fp32_path, candidate, p.samples, max_samples=PARITY_SAMPLES)
    search: dict[str, Any] = {
        "ran": False,
        "threshold": settings.min_output_cosine,
        "threshold_met": parity["min_cosine"] >= settings.min_output_cosine,
    }
    by_search: list[str] = []
    if not search["threshold_met"] and settings.max_float_layers > 0:
        by_search, parity, search = _search_float_nodes(p, candidate, settings, cache, parity, work)

    _copy_atomic(candidate, final_path)
    structure = describe_qdq(final_path)
    return {
        "graph": p.graph,
        "fp32_path": str(p.fp32_path),
        "int8_path": str(final_path),
        "fp32_bytes": p.fp32_path.stat().st_size,
        "int8_bytes": final_path.stat().st_size,
        "sha256": sha256_file(final_path),
        "calibration_samples": len(p.samples),
        "calibration_rows": int(sum(next(iter(s.values())).shape[0] for s in p.samples)),
        "op_counts_fp32": dict(sorted(p.fp32_counts.items())),
        "op_counts_int8": structure.pop("op_counts"),
        **structure,
        "ort_cpu": describe_ort_kernels(final_path),
        "host_machine": platform.machine(),
        "kept_float": {"requested": p.keep_float, "by_search": by_search},
        "sensitivity_search": search,
        "parity": parity,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _worst(parity: Mapping[str, Any]) -> str:
    return min(parity["outputs"], key=lambda name: parity["outputs"][name]["cosine"])


def _search_float_nodes(
    p: _Prepared,
    candidate: Path,
    settings: QuantizationSettings,
    cache: Path,
    parity: dict[str, Any],
    work: Path,
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Keep the most sensitive layers in float until the output cosine meets the threshold.

    Layers are ranked once by the noise each adds (:func:`_rank_sensitive_nodes`); then the top
    1, 2, 4, ... are kept in float with their float islands, re-quantizing from the cached
    calibration ranges, until the threshold is met, the ``max_float_layers`` bound or the
    ``search_seconds`` budget is reached. The best trial is kept if it meets the threshold or at
    least halves the gap to a cosine of 1; otherwise the graph stays fully INT8.
    """
    t0 = time.perf_counter()
    threshold = settings.min_output_cosine
    log.warning(
        "%s: INT8 min output cosine %.4f < %.4f; searching for layers to keep in float",
        p.graph,
        parity["min_cosine"],
        threshold,
    )
    candidates = [n for n in p.nodes if n.op_type in COMPUTE_OPS and n.name not in p.keep_float]
    ranked = _rank_sensitive_nodes(
        p.pre_path, candidate, p.samples[:SENSITIVITY_SAMPLES], candidates, p.nodes, work
    )
    by_name = {n.name: n for n in p.nodes}
    trials: list[dict[str, Any]] = [
        {
            "sensitive_nodes": 0,
            "min_cosine": parity["min_cosine"],
            "min_snr_db": parity["min_snr_db"],
            "worst_output": _worst(parity),
        }
    ]
    best = ([], parity, candidate.read_bytes())
    stopped_by = "max_float_layers"
    trial_path = work / f"{p.graph}.trial.onnx"
    k = 1
    while True:
        k = min(k, settings.max_float_layers, len(ranked))
        if k < 1 or any(t["sensitive_nodes"] == k for t in trials):
            break
        if time.perf_counter() - t0 > settings.search_seconds:
            stopped_by = "search_seconds"
            break
        chosen = [r["node"] for r in ranked[:k]]
        nodes = sorted(
            {name for c in chosen for name in float_island(by_name[c], p.nodes)} - set(p.keep_float)
        )
        _quantize(
            p.pre_path, trial_path, GraphInputs(p.samples), settings, p.keep_float + nodes, cache
        )
        trial = measure_graph_parity(p.fp32_path, trial_path, p.samples, max_samples=PARITY_SAMPLES)
        trials.append(
            {
                "sensitive_nodes": k,
                "chosen": chosen,
                "float_nodes": nodes,
                "min_cosine": trial["min_cosine"],
                "min_snr_db": trial["min_snr_db"],
                "worst_output": _worst(trial),
            }
        )
        if trial["min_cosine"] > best[1]["min_cosine"]:
            best = (nodes, trial, trial_path.read_bytes())
        if trial["min_cosine"] >= threshold:
            stopped_by = "threshold_met"
            break
        k *= 2
    # float layers cost speed: keep them only if they reach the threshold, or at least halve
    # the distance to a perfect cosine; a marginal gain leaves the graph fully INT8
    gap = 1.0 - parity["min_cosine"]
    best_gap = 1.0 - best[1]["min_cosine"]
    if best[0] and best[1]["min_cosine"] < threshold and best_gap > gap / 2:
        best = ([], parity, candidate.read_bytes())
    nodes, parity, data = best
    candidate.write_bytes(data)
    met = parity["min_cosine"] >= threshold
    if met:
        log.info(
            "%s: kept %d node(s) in float to reach cosine %.4f: %s",
            p.graph,
            len(nodes),
            parity["min_cosine"],
            ", ".join(nodes),
        )
    else:
        log.warning(
            "%s: still below cosine %.4f with %d node(s) in float (best %.4f); the "
            "parity gate decides",
            p.graph,
            threshold,
            len(nodes),
            parity["min_cosine"],
        )
    search = {
        "ran": True,
        "threshold": threshold,
        "threshold_met": met,
        "stopped_by": stopped_by,
        "ranking": ranked[: 2 * max(settings.max_float_layers, 1)],
        "trials": trials,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return nodes, parity, search


def quantize_graphs(
    fp32_dir: Path,
    out_dir: Path,
    calibration_inputs: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    settings: QuantizationSettings = QuantizationSettings(),
) -> dict[str, Any]:
    """QDQ INT8 versions of the static graphs in ``fp32_dir``, written to ``out_dir``.

    ``calibration_inputs`` maps each graph name to its captured input dicts (see
    :func:`calibration.collect_graph_inputs`); every graph in ``fp32_dir/models/fp32`` needs some.
    ``out_dir`` may be ``fp32_dir`` itself (INT8 graphs then sit beside the FP32 ones).
    Returns the report: settings, runtime versions, and per graph op counts before/after, which
    op types were quantized and which stayed float, sizes, SHA-256, parity against FP32, the
    layers kept in float, and time.
    """
    import onnx
    import onnxruntime

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    models = fp32_dir / "models" / "fp32"
    spec = fp32_dir / "graph_spec.json"
    if not spec.is_file():
        raise ConversionError(f"{spec}: graph spec not found; run the export stage first")
    found = sorted(p.stem for p in models.glob("*.onnx"))
    if not found:
        raise ConversionError(f"{models}: no FP32 graphs (*.onnx) to quantize; export first")
    graphs = [g for g in GRAPH_ORDER if g in found] + [g for g in found if g not in GRAPH_ORDER]
    samples: dict[str, list[dict[str, np.ndarray]]] = {}
    for graph in graphs:
        given = [dict(s) for s in calibration_inputs.get(graph, ())]
        samples[graph] = [s for s in given if all(v.shape[0] > 0 for v in s.values())]
        if not samples[graph]:
            raise ConversionError(
                f"no usable calibration inputs for graph {graph} of {models} ({len(given)} given,"
                " all empty or none); collect them with calibration.collect_graph_inputs on the "
                "FP32 engine, on images where the model finds objects"
            )

    t0 = time.perf_counter()
    log.info(
        "quantizing %s to INT8 (QDQ, %s, per_channel=%s, activations %s, weights %s)",
        ", ".join(graphs),
        settings.calibrate_method,
        settings.per_channel,
        settings.activation_type,
        settings.weight_type,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_dir) as tmp:
        work = Path(tmp)
        prepared = [_prepare(g, models / f"{g}.onnx", samples[g], settings.for_graph(g), work)
                    for g in graphs]
        _check_keep_float(settings, prepared)
        int8_dir = out_dir / "models" / "int8"
        int8_dir.mkdir(parents=True, exist_ok=True)
        for p in prepared:
            r = reports[p.graph] = _quantize_prepared(
                p, int8_dir / f"{p.graph}.onnx", settings.for_graph(p.graph), work
            )
            r["calibrate_method"] = settings.for_graph(p.graph).calibrate_method
            log.info(
                "%s: %d -> %d bytes, %d Q / %d DQ, min cosine %.4f, SNR %.1f dB, %.1fs",
                p.graph,
                r["fp32_bytes"],
                r["int8_bytes"],
                r["quantize_linear"],
                r["dequantize_linear"],
                r["parity"]["min_cosine"],
                r["parity"]["min_snr_db"],
                r["seconds"],
            )
    if out_dir.resolve() != fp32_dir.resolve():
        _copy_atomic(spec, out_dir / "graph_spec.json")

    seconds = round(time.perf_counter() - t0, 2)
    log.info("quantized %d graphs in %.1fs -> %s", len(graphs), seconds, out_dir / "models/int8")
    return {
        "format": "QDQ",
        "quantizer": "onnxruntime.quantization.quantize_static",
        "settings": settings.to_dict(),
        "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        "host_machine": platform.machine(),
        "graphs": reports,
        "kept_float_nodes": {
            g: r["kept_float"]["requested"] + r["kept_float"]["by_search"]
            for g, r in reports.items()
        },
        "min_cosine": min(r["parity"]["min_cosine"] for r in reports.values()),
        "limitations": _limitations(reports),
        "out_dir": str(out_dir),
        "seconds": seconds,
    }


def _limitations(reports: Mapping[str, Any]) -> list[str]:
    """What a user of these INT8 graphs should know, in words, for the manifest."""
    notes = []
    for graph, r in reports.items():
        floats = r["ort_cpu"]["float_compute"]
        if floats:
            ops = ", ".join(f"{op} x{n}" for op, n in floats.items())
            notes.append(
                f"{graph}: ONNX Runtime ({r.get('host_machine', 'build host')} CPU) "
                f"runs {ops} in float between Q/DQ (no INT8 kernel fused)"
            )
        kept = r["kept_float"]["requested"] + r["kept_float"]["by_search"]
        if kept:
            notes.append(
                f"{graph}: {len(kept)} node(s) kept in float for accuracy: " + ", ".join(kept)
            )
        search = r["sensitivity_search"]
        if not search["threshold_met"]:
            notes.append(
                f"{graph}: INT8 outputs reach cosine {r['parity']['min_cosine']:.4f} "
                f"vs FP32 on the calibration inputs, below {search['threshold']}"
            )
    return notes


def _check_keep_float(settings: QuantizationSettings, prepared: Sequence[_Prepared]) -> None:
    """Every node or op type the settings keep in float must exist in some graph."""
    names = {n.name for p in prepared for n in p.nodes}
    op_types = {n.op_type for p in prepared for n in p.nodes}
    unknown_nodes = [n for n in settings.keep_float_nodes if n not in names]
    unknown_ops = [t for t in settings.keep_float_op_types if t not in op_types]
    if unknown_nodes or unknown_ops:
        graphs = ", ".join(p.graph for p in prepared)
        examples = ", ".join(sorted(names)[:5])
        present = ", ".join(sorted(op_types))
        raise ConfigError(
            f"quantization keep-float settings match nothing in {graphs}: nodes {unknown_nodes}, "
            f"op types {unknown_ops}; use node names of the pre-processed graphs (e.g. "
            f"{examples}; the report's sensitivity ranking lists more) or op types present "
            f"({present})"
        )
