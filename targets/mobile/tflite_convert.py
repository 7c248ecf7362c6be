"""ONNX static graphs -> FP32 and full-integer INT8 LiteRT (``.tflite``) graphs, offline.

For each graph in ``<fp32_dir>/models/fp32/`` (``backbone``, ``box_head``, ``mask_head``):

1. refuse graphs with data-dependent shapes or already quantized ones (the same check as the
   ONNX Runtime quantizer, :func:`targets.ort_quantize.check_quantizable`);
2. convert a *copy* of the ONNX file (onnx2tf rewrites its input) in a temporary folder to a
   TensorFlow SavedModel with onnx2tf (NCHW -> NHWC, signature keyed by the ONNX input/output
   names). The heads' RoI axis is fixed to a static size (:func:`head_rows`; the runner runs
   more RoIs in chunks), so no tensor is dynamic. The copy is rewritten first (:data:`REWRITES`)
   where an ONNX op would become a TFLite op that XNNPACK cannot run in int8 - HardSwish,
   HardSigmoid, the FPN's nearest 2x Resize and its 1x1 stride-2 MaxPool - into ops that compute
   the same values and that XNNPACK and the GPU delegate take: without them the INT8 backbone ran
   in 23 XNNPACK partitions with LiteRT's reference kernels between them, with them in one.
   onnx2tf runs with its ONNX simplifier off (it
   would call the ``onnxsim`` command from PATH) and its own quantization off: its INT8 path
   downloads a sample calibration file for 3-channel inputs even when calibration data is given.
   Every onnx2tf and TensorFlow call runs with outgoing connections refused
   (:func:`no_network`), so a converter that tries to reach the network fails the build loudly
   instead of fetching anything;
3. TensorFlow's ``TFLiteConverter`` writes the FP32 ``.tflite`` and the full-integer INT8 one:
   ``TFLITE_BUILTINS_INT8`` only (int8 weights, per-channel unless the profile says per-tensor,
   and int8 activations everywhere; a graph with an op that has no int8 kernel fails instead of
   silently staying float), calibrated on a representative dataset made of the captured graph
   inputs - the backbone on letterboxed calibration images, the heads on real pooled RoI
   features - transposed to NHWC. Activation ranges are TFLite's min-max, or (profile
   ``calibrate_method: percentile``) the profile's percentile of every activation over the same
   calibration run (:func:`percentile_ranges`), written into TFLite's calibrated model before
   its quantizer runs; min-max left the demo student's INT8 mask AP 2.0 points under FP32,
   percentile 99.999 narrows the outlier-driven ranges. Input and output types stay float32:
   the model quantizes its inputs and dequantizes its outputs itself with its own scales and
   zero points, so the runner feeds and reads float (documented per graph in the report and the
   ``.io.json`` sidecars);
4. bind inputs and outputs with numbers, not assumptions: the FP32 ``.tflite`` is run on
   calibration inputs beside ONNX Runtime, and for every ONNX output the (signature key, axis
   permutation) whose values match it is found among the LiteRT outputs of the same size; the
   input permutation is chosen the same way when the shape alone leaves a choice (square
   inputs). The INT8 graph's bound outputs must then each be closest to their own ONNX output;
   a binding that does not hold is a :class:`~pipeline.errors.ConversionError`. The binding goes
   into ``<graph>.io.json`` beside each ``.tflite``, which the runner's LiteRT backend reads;
5. check each ``.tflite`` (:func:`inspect_tflite`): operators listed, no Flex/Select-TF or
   custom ops, no dynamic tensors, the INT8 graph full-integer (every Conv/FC weight int8, every
   activation int8 between the boundary quantize/dequantize), the XNNPACK delegate's node count
   and partitions, and LiteRT's GPU-delegate compatibility per op. A profile that requires the
   GPU delegate fails the build with the incompatible ops named.

Why onnx2tf + TFLiteConverter: the feasibility spike for this target (issue 5) measured onnx2tf
and litert-torch converting these graphs exactly in FP32; litert-torch's PT2E INT8 gave mixed
int8/float outputs (its heads take int8 inputs) and pulls in jax, transformers and torchao, and
onnx2tf's own INT8 path (``-oiqt``) cannot be kept offline. TensorFlow's converter is the
maintained full-integer quantizer behind onnx2tf's, and calibrating it directly on the captured
inputs keeps one code path for every graph. Measured here on the demo student: FP32 ``.tflite``
cosine 1.0 against ONNX Runtime on every output, INT8 at least 0.9998 per graph, and the
through-the-runner AP the build gates on (manifest ``parity``); with parity inside the budget,
litert-torch would not earn its dependencies. Per-output cosine and SNR are in the report.

Reads: ``<fp32_dir>/graph_spec.json`` and ``<fp32_dir>/models/fp32/*.onnx``.
Writes: ``<out_dir>/graph_spec.json``, ``<out_dir>/models/{fp32,int8}/<graph>.tflite`` and
``<graph>.io.json``; the SavedModels live in a temporary folder, removed afterwards.

Known limits: calibration is min-max or percentile (no entropy; the percentile ranges hook
TensorFlow's private ``lite._mlir_quantize``, so TensorFlow is pinned); ``keep_float_nodes``/
``max_float_layers`` are not
supported (full-integer means no float fallback); TFLite's int8 scheme is fixed (weights
symmetric int8, activations asymmetric int8), so ``activation_type``/``weight_type`` must be
``int8``. The ops report's XNNPACK partition count is the build host's XNNPACK; a phone's may
differ by CPU features. GPU-delegate compatibility is judged from LiteRT's op table
(:data:`GPU_DELEGATE_OPS`), not by running the delegate, and not per op version or tensor rank.
The heads run a static number of RoIs per call, so a call with fewer computes padding.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import sha256_file
from pipeline.errors import ConfigError, ConversionError
from targets.profiles import QuantizationSettings

log = logging.getLogger(__name__)

GRAPH_ORDER = ("backbone", "box_head", "mask_head")
# static RoI rows per call of the heads (the runner runs N RoIs in ceil(N / rows) calls, zero-
# padding the last): the box head takes all the RPN's post-NMS proposals at once (an image nearly
# always has that many), the mask head the detections in calls of MASK_ROWS (an image has from 0
# to detections_per_img of them, so one call of the maximum would mostly compute padding)
MASK_ROWS = 8
BINDING_SAMPLES = 2
PARITY_SAMPLES = 8
MIN_FP32_COSINE = 0.9999
IO_FORMAT = "maskedge-litert-io"
SIGNATURE = "serving_default"
OPS_REPORT = "ops_report.json"
WEIGHT_OPS = {
    "CONV_2D": 1,
    "DEPTHWISE_CONV_2D": 1,
    "FULLY_CONNECTED": 1,
    "TRANSPOSE_CONV": 1,
}
BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
# activation ranges: TFLite's own min-max, or percentiles of the same calibration run; with
# "percentile" each graph takes whichever of the profile's percentile and these is closest to FP32
# on the calibration inputs (a per-graph choice measured on calibration data, never on val)
CALIBRATION_METHODS = ("minmax", "percentile")
PERCENTILE_CANDIDATES = (99.999, 99.99, 99.9)


class NetworkBlocked(OSError):
    """Raised by a socket connect while :func:`no_network` is active."""


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Refuse every outgoing connection (TCP/UDP connect, name lookups) inside the block."""
    saved = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
        socket.create_connection,
    )

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NetworkBlocked(
            "maskedge converts offline: a converter tried to open a network connection "
            f"({args[1:] if len(args) > 1 else args})"
        )

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    socket.create_connection = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        (
            socket.socket.connect,
            socket.socket.connect_ex,
            socket.getaddrinfo,  # type: ignore
            socket.create_connection,
        ) = saved


def import_tensorflow() -> Any:
    """``tensorflow``, imported after ``triton`` where triton is installed (torch pulls it in).

    TensorFlow 2.20+ wheels load their LLVM with ``RTLD_GLOBAL``; a ``triton`` imported after that
    (``import torchvision`` imports it through ``torch._dynamo``) binds to TF's LLVM and the
    process dies with SIGSEGV. Imported the other way round both work.
    """
    # The triton pre-import can go once TF wheels stop loading with RTLD_GLOBAL
    # (tensorflow/tensorflow#124205); a test imports torch first and converts, to see it hold.
    import importlib.util

    if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
    # TensorFlow's C++ INFO/WARNING lines (per SavedModel load, per op) would swamp the build log
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    try:
        import tensorflow as tf
    except ImportError as err:
        raise ConversionError(
            'the mobile target converts with onnx2tf and TensorFlow: pip install -e ".[mobile]"'
        ) from err
    return tf


def check_settings(settings: QuantizationSettings) -> None:
    """Refuse profile settings this quantizer cannot honour, naming the key and what to set."""
    problems = []
    if settings.calibrate_method not in CALIBRATION_METHODS:
        problems.append(
            f"calibrate_method={settings.calibrate_method!r} (the mobile quantizer calibrates "
            f"with {' or '.join(CALIBRATION_METHODS)}: set one of them)"
        )
    for key in ("activation_type", "weight_type"):
        if getattr(settings, key) != "int8":
            problems.append(
                f'{key}={getattr(settings, key)!r} (TFLite full-integer is int8: set "int8")'
            )
    if settings.keep_float_nodes or settings.keep_float_op_types:
        problems.append(
            "keep_float_nodes/keep_float_op_types (full-integer INT8 keeps nothing in "
            "float: leave them empty)"
        )
    if problems:
        raise ConfigError(
            "the mobile target's quantizer cannot use these quantization settings: "
            + "; ".join(problems)
        )


# --- conversion ---------------------------------------------------------------------------------


def _onnx_io(path: Path) -> tuple[list[tuple[str, list[Any]]], list[str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    inputs = [
        (
            i.name,
            [
                d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in i.type.tensor_type.shape.dim
            ],
        )
        for i in model.graph.input
        if i.name not in init
    ]
    return inputs, [o.name for o in model.graph.output]


# onnx2tf test-runs every 3-channel image graph on 20 sample images during conversion and
# downloads them unless this file is in the working folder (onnx2tf.utils.common_functions.
# download_test_image_data); maskedge writes it from its own calibration images instead
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
ONNX2TF_SAMPLE_SHAPE = (20, 128, 128, 3)


def write_onnx2tf_samples(folder: Path, samples: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """onnx2tf's sample-image file, made of the graph's own calibration inputs (offline).

    Image inputs (N,3,H,W) are resized to 128x128 (nearest) in NHWC; a graph without a 3-channel
    image input gets the calibration set's spread of values in that shape (onnx2tf reads the file
    only for 3-channel image inputs, but it must exist so that it is never fetched).
    """
    n, size, _, channels = ONNX2TF_SAMPLE_SHAPE
    images = [v for s in samples for v in s.values() if v.ndim == 4 and v.shape[1] == channels]
    if images:
        stack = np.concatenate(images)[:, :, :, :].astype(np.float32)
        h, w = stack.shape[2:]
        rows = (np.arange(size) * h // size)[:, None]
        cols = (np.arange(size) * w // size)[None, :]
        small = np.transpose(stack[:, :, rows, cols], (0, 2, 3, 1))
        data = small[np.arange(n) % len(small)]
    else:
        data = np.zeros(ONNX2TF_SAMPLE_SHAPE, np.float32)
    path = folder / ONNX2TF_SAMPLE_FILE
    np.save(path, np.ascontiguousarray(data, dtype=np.float32))
    return path


def rewrite_hard_sigmoid(model: Any) -> int:
    """Replace each ONNX ``HardSigmoid`` (MobileNetV3's squeeze-excite gate) in place with
    ``Clip(6*alpha*x + 6*beta, 0, 6) / 6``, the same function; returns how many were replaced.

    TFLite turns HardSigmoid into ``RELU_0_TO_1``, which neither XNNPACK's int8 path nor LiteRT's
    GPU delegate implement (each one splits the XNNPACK graph and keeps the GPU delegate off);
    the rewritten form converts to ADD (fused RELU6) and MUL, which both run.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    replaced = 0
    del graph.node[:]
    for node in nodes:
        if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx"):
            graph.node.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        base = f"{node.name or node.output[0]}/hardsigmoid"
        consts = {
            f"{base}/scale": 6.0 * alpha,
            f"{base}/shift": 6.0 * beta,
            f"{base}/zero": 0.0,
            f"{base}/six": 6.0,
            f"{base}/sixth": 1.0 / 6.0,
        }
        graph.initializer.extend(
            numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()
        )
        x = node.input[0]
        if abs(6.0 * alpha - 1.0) > 1e-6:
            graph.node.append(
                helper.make_node(
                    "Mul", [x, f"{base}/scale"], [f"{base}/scaled"], name=f"{base}/Mul"
                )
            )
            x = f"{base}/scaled"
        graph.node.extend(
            [
                helper.make_node(
                    "Add", [x, f"{base}/shift"], [f"{base}/shifted"], name=f"{base}/Add"
                ),
                helper.make_node(
                    "Clip",
                    [f"{base}/shifted", f"{base}/zero", f"{base}/six"],
                    [f"{base}/clipped"],
                    name=f"{base}/Clip",
                ),
                helper.make_node(
                    "Mul",
                    [f"{base}/clipped", f"{base}/sixth"],
                    [node.output[0]],
                    name=f"{base}/Div",
                ),
            ]
        )
        replaced += 1
    return replaced


def rewrite_hard_swish(model: Any) -> int:
    """Replace each ONNX ``HardSwish`` (MobileNetV3's activation) in place with
    ``(Clip(x + 3, 0, 6) * x) * (1/6)``, the same function; returns how many were replaced.

    TFLite keeps HardSwish as ``HARD_SWISH``, whose int8 form XNNPACK does not take: each one cut
    the INT8 backbone's XNNPACK graph in two (20 of them made 23 partitions, with the ops between
    run on LiteRT's reference kernels). The converter folds the usual spellings
    (``x * relu6(x + 3) / 6`` and ``x * (relu6(x + 3) / 6)``) back into ``HARD_SWISH``; this order
    it does not, and converts to ADD (fused RELU6) and MUL (the 1/6 mostly folded into the next
    convolution), which XNNPACK and the GPU delegate both run in int8.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    replaced = 0
    del graph.node[:]
    for node in nodes:
        if node.op_type != "HardSwish" or node.domain not in ("", "ai.onnx"):
            graph.node.append(node)
            continue
        base = f"{node.name or node.output[0]}/hardswish"
        consts = {
            f"{base}/three": 3.0,
            f"{base}/zero": 0.0,
            f"{base}/six": 6.0,
            f"{base}/sixth": 1.0 / 6.0,
        }
        graph.initializer.extend(
            numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()
        )
        x = node.input[0]
        graph.node.extend(
            [
                helper.make_node(
                    "Add", [x, f"{base}/three"], [f"{base}/shifted"], name=f"{base}/Add"
                ),
                helper.make_node(
                    "Clip",
                    [f"{base}/shifted", f"{base}/zero", f"{base}/six"],
                    [f"{base}/gate"],
                    name=f"{base}/Clip",
                ),
                helper.make_node(
                    "Mul", [f"{base}/gate", x], [f"{base}/product"], name=f"{base}/Mul"
                ),
                helper.make_node(
                    "Mul",
                    [f"{base}/product", f"{base}/sixth"],
                    [node.output[0]],
                    name=f"{base}/Div",
                ),
            ]
        )
        replaced += 1
    return replaced


def _static_shapes(model: Any) -> dict[str, list[int]]:
    """Every value's static shape in ``model`` (shapes inferred; symbolic axes left out)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    return shapes


def rewrite_nearest_upsample(model: Any) -> int:
    """Replace each nearest-neighbour ``Resize`` that doubles H and W exactly (the FPN's top-down
    upsampling) with ``DepthToSpace(Concat([x, x, x, x], channels), 2)``, the same values;
    returns how many were replaced.

    TFLite's ``RESIZE_NEAREST_NEIGHBOR`` has no XNNPACK kernel, so each one split the INT8
    backbone; CONCATENATION and DEPTH_TO_SPACE run on XNNPACK and the GPU delegate in int8. Only
    the mapping ``out[i] = in[floor(i / 2)]`` is rewritten (``coordinate_transformation_mode``
    ``asymmetric``, ``nearest_mode`` ``floor`` or ``round_prefer_floor``, as torch exports
    ``F.interpolate(mode="nearest")``); any other Resize is left as it is.
    """
    from onnx import helper

    shapes = _static_shapes(model)
    graph = model.graph
    nodes = list(graph.node)
    replaced = 0
    del graph.node[:]
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        source, target = shapes.get(node.input[0] if node.input else ""), shapes.get(node.output[0])
        doubles = (
            source is not None
            and target is not None
            and len(source) == len(target) == 4
            and target[:2] == source[:2]
            and target[2:] == [2 * source[2], 2 * source[3]]
        )
        if (
            node.op_type != "Resize"
            or node.domain not in ("", "ai.onnx")
            or not doubles
            or attrs.get("mode", b"nearest") != b"nearest"
            or attrs.get("coordinate_transformation_mode") != b"asymmetric"
            or attrs.get("nearest_mode", b"round_prefer_floor")
            not in (b"floor", b"round_prefer_floor")
        ):
            graph.node.append(node)
            continue
        base = f"{node.name or node.output[0]}/upsample2x"
        graph.node.extend(
            [
                helper.make_node(
                    "Concat", [node.input[0]] * 4, [f"{base}/tiled"], axis=1, name=f"{base}/Concat"
                ),
                helper.make_node(
                    "DepthToSpace",
                    [f"{base}/tiled"],
                    [node.output[0]],
                    blocksize=2,
                    mode="DCR",
                    name=f"{base}/DepthToSpace",
                ),
            ]
        )
        replaced += 1
    return replaced


def rewrite_subsample_pool(model: Any) -> int:
    """Replace each 1x1 ``MaxPool`` without padding (the FPN's extra "pool" level: a strided
    subsampling) with a depthwise 1x1 ``Conv`` of weight 1 and the same strides, the same values;
    returns how many were replaced. XNNPACK takes no 1x1 pooling, so the MAX_POOL_2D split the
    INT8 backbone; the depthwise convolution runs on XNNPACK and the GPU delegate."""
    from onnx import helper, numpy_helper

    shapes = _static_shapes(model)
    graph = model.graph
    nodes = list(graph.node)
    replaced = 0
    del graph.node[:]
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape = shapes.get(node.input[0] if node.input else "")
        if (
            node.op_type != "MaxPool"
            or node.domain not in ("", "ai.onnx")
            or shape is None
            or len(shape) != 4
            or list(attrs.get("kernel_shape", [])) != [1, 1]
            or any(attrs.get("pads", [0]))
            or set(attrs.get("dilations", [1])) != {1}
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
            or len(node.output) != 1
        ):
            graph.node.append(node)
            continue
        base = f"{node.name or node.output[0]}/subsample"
        channels = shape[1]
        graph.initializer.append(
            numpy_helper.from_array(np.ones((channels, 1, 1, 1), np.float32), f"{base}/ones")
        )
        graph.node.append(
            helper.make_node(
                "Conv",
                [node.input[0], f"{base}/ones"],
                [node.output[0]],
                group=channels,
                kernel_shape=[1, 1],
                strides=list(attrs.get("strides", [1, 1])),
                name=f"{base}/Conv",
            )
        )
        replaced += 1
    return replaced


def drop_dead_nodes(model: Any) -> int:
    """Remove nodes whose outputs nothing reads (e.g. the shape arithmetic of a replaced Resize)
    and initializers no node reads; returns how many nodes were removed."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [i for i in graph.initializer if i.name not in needed]
    for init in unused:
        graph.initializer.remove(init)
    return removed


# Rewrites of the ONNX copy, in order, each the same function in ops that XNNPACK and LiteRT's
# GPU delegate run in int8; their counts per graph are in the quantize report (onnx_rewrites)
REWRITES = (
    ("HardSigmoid", rewrite_hard_sigmoid),
    ("HardSwish", rewrite_hard_swish),
    ("Resize nearest 2x", rewrite_nearest_upsample),
    ("MaxPool 1x1", rewrite_subsample_pool),
)


def write_static_copy(onnx_path: Path, copy: Path, rows: int | None) -> dict[str, int]:
    """``onnx_path`` with its first (RoI) axis fixed to ``rows``, every other axis checked static.

    onnx2tf's ``overwrite_input_shape`` reaches only its onnxsim step, which maskedge keeps off,
    so the shapes are fixed in the ONNX copy itself (inputs and outputs; inner shapes are
    inferred again). The :data:`REWRITES` are applied to the copy; returns how many of each were
    made. The FP32 ``.tflite`` is later checked against ``onnx_path`` itself (:func:`bind_io`),
    so a rewrite that changed the function fails the build.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    init = {i.name for i in model.graph.initializer}
    for value in [*[i for i in model.graph.input if i.name not in init], *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for k, dim in enumerate(dims):
            if k == 0 and rows is not None:
                dim.Clear()
                dim.dim_value = rows
            elif not dim.HasField("dim_value") or dim.dim_value <= 0:
                shown = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
                raise ConversionError(
                    f"{onnx_path}: {value.name} has shape {shown} with a symbolic axis other "
                    "than the first; the mobile target needs static shapes (re-export the graph)"
                )
    del model.graph.value_info[:]
    counts = {name: rewrite(model) for name, rewrite in REWRITES}
    drop_dead_nodes(model)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, str(copy))
    return {name: n for name, n in counts.items() if n}


def to_saved_model(
    onnx_path: Path, work: Path, rows: int | None, samples: Sequence[Mapping[str, np.ndarray]]
) -> tuple[Path, dict[str, int]]:
    """onnx2tf: a SavedModel of ``onnx_path`` (a copy is converted), first axis fixed to ``rows``;
    returns its folder and the rewrites made in the copy (:func:`write_static_copy`).

    Runs in ``work/<graph>`` as the working folder, with onnx2tf's sample-image file written
    there from ``samples`` and every network connection refused.
    """
    folder = work / onnx_path.stem
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{onnx_path.stem}.onnx"
    rewrites = write_static_copy(onnx_path, copy, rows)
    write_onnx2tf_samples(folder, samples)
    out = folder / "saved_model"
    import_tensorflow()
    try:
        import onnx2tf
    except ImportError as err:
        raise ConversionError(
            'the mobile target converts with onnx2tf and TensorFlow: pip install -e ".[mobile]"'
        ) from err
    try:
        with no_network(), contextlib.chdir(folder), _quiet():
            onnx2tf.convert(
                input_onnx_file_path=str(copy),
                output_folder_path=str(out),
                output_signaturedefs=True,
                not_use_onnxsim=True,
                non_verbose=True,
                verbosity="error",
            )
    except NetworkBlocked as err:
        raise ConversionError(f"{onnx_path}: onnx2tf tried to reach the network: {err}") from err
    except SystemExit as err:  # onnx2tf calls sys.exit() on some failures
        raise ConversionError(f"{onnx_path}: onnx2tf failed (exit {err.code})") from err
    except Exception as err:
        cause = err
        while cause.__context__ is not None and not isinstance(cause, NetworkBlocked):
            cause = cause.__context__
        if isinstance(cause, NetworkBlocked):
            raise ConversionError(
                f"{onnx_path}: onnx2tf tried to reach the network: {cause}"
            ) from err
        raise ConversionError(f"{onnx_path}: onnx2tf failed: {type(err).__name__}: {err}") from err
    if not (out / "saved_model.pb").is_file():
        raise ConversionError(f"{onnx_path}: onnx2tf wrote no SavedModel in {out}")
    return out, rewrites


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep converters' progress prints out of the build log (they go to the debug log)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        log.debug("converter output:\n%s", buffer.getvalue()[-4000:])


def _representative(
    samples: Sequence[Mapping[str, np.ndarray]],
    keys: Mapping[str, str],
    perms: Mapping[str, Sequence[int]],
    rows: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Calibration batches in the SavedModel's layout; head inputs re-cut to ``rows`` rows."""
    names = list(keys)
    stacked = {
        n: np.concatenate([np.asarray(s[n], np.float32) for s in samples if s[n].shape[0]])
        for n in names
    }
    total = next(iter(stacked.values())).shape[0]
    for start in range(0, total, rows):
        idx = np.arange(start, start + rows) % total  # the last batch wraps to the first rows
        yield {
            keys[n]: np.ascontiguousarray(np.transpose(stacked[n][idx], perms[n])) for n in names
        }


def percentile_ranges(
    calibrated: bytes,
    representative: Sequence[dict[str, np.ndarray]],
    percentile: float,
    output_percentile: float | None = None,
) -> dict[int, tuple[float, float]]:
    """Activation ranges of a calibrated model at ``percentile``, by tensor index.

    ``calibrated`` is TFLite's calibrated float model (every activation carries the min/max its
    calibrator saw). It is run on the same ``representative`` batches keeping every tensor; per
    tensor the range is ``[q(100 - percentile), q(percentile)]`` of all its values over all
    batches (exact order statistics: only the tails are kept), widened to include 0 and never
    wider than the calibrator's min/max. The model's inputs keep the min-max range (normalized
    images have no outliers to cut); its outputs take ``output_percentile`` (default
    ``percentile``). Measured on the demo student: a 99.9 cut on the outputs clipped the largest
    RPN box deltas (worst-sample cosine 0.87) and lost every detection on 4.5 % of the val
    images, min-max outputs left the activations inside coarse (box AP 2.6 points under FP32).
    """
    from ai_edge_litert import interpreter as litert
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    graph = model.subgraphs[0]
    inputs = set(graph.inputs)
    ranged = {
        i: (float(t.quantization.min[0]), float(t.quantization.max[0]))
        for i, t in enumerate(graph.tensors)
        if t.quantization is not None
        and t.quantization.min is not None
        and len(t.quantization.min) == 1
        and t.buffer is not None
        and not (model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data))
        and i not in inputs
    }
    outputs = set(graph.outputs)
    interp = litert.Interpreter(
        model_content=calibrated,
        num_threads=1,
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interp.allocate_tensors()
    runner = interp.get_signature_runner(SIGNATURE)
    tails: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    keep: dict[int, int] = {}
    for batch in representative:
        runner(**batch)
        for i in ranged:
            values = np.asarray(interp.get_tensor(i), np.float32).ravel()
            if i not in keep:
                total = values.size * len(representative)
                cut = output_percentile if i in outputs and output_percentile else percentile
                keep[i] = min(values.size, max(1, int(np.ceil(total * (100.0 - cut) / 100))))
            k = keep[i]
            low = np.partition(values, k - 1)[:k]
            high = np.partition(values, values.size - k)[-k:]
            if i in tails:
                low = np.partition(np.concatenate([tails[i][0], low]), k - 1)[:k]
                high = np.partition(np.concatenate([tails[i][1], high]), -k)[-k:]
            tails[i] = (low, high)
    ranges = {}
    for i, (lo_seen, hi_seen) in ranged.items():
        low, high = tails[i]
        lo = max(lo_seen, min(0.0, float(low.max())))
        hi = min(hi_seen, max(0.0, float(high.min())))
        ranges[i] = (lo, hi) if hi > lo else (lo_seen, hi_seen)
    return ranges


@contextlib.contextmanager
def _calibration_ranges(
    representative: Sequence[dict[str, np.ndarray]],
    percentile: float | None,
    output_percentile: float | None = None,
) -> Iterator[dict[str, Any]]:
    """While active, TFLiteConverter quantizes with :func:`percentile_ranges` instead of its
    min-max (``percentile`` None: unchanged). The converter hands its calibrated model to
    ``tensorflow.lite.python.lite._mlir_quantize``; the ranges are written into that model's
    tensors first, so every other step of the conversion stays TFLite's own. Yields a record
    of how many activation ranges were narrowed."""
    record: dict[str, Any] = {
        "method": "minmax" if percentile is None else "percentile",
        "percentile": percentile,
        "output_percentile": output_percentile if percentile is not None else None,
        "tensors": 0,
        "narrowed": 0,
    }
    if percentile is None:
        yield record
        return
    from tensorflow.lite.python import lite
    from tensorflow.lite.tools import flatbuffer_utils

    original = lite._mlir_quantize

    def quantize(calibrated: bytes, *args: Any, **kwargs: Any) -> bytes:
        ranges = percentile_ranges(calibrated, representative, percentile, output_percentile)
        model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
        tensors = model.subgraphs[0].tensors
        for i, (lo, hi) in ranges.items():
            q = tensors[i].quantization
            record["narrowed"] += (lo, hi) != (float(q.min[0]), float(q.max[0]))
            q.min, q.max = [lo], [hi]
        record["tensors"] = len(ranges)
        return original(bytes(flatbuffer_utils.convert_object_to_bytearray(model)), *args, **kwargs)

    lite._mlir_quantize = quantize
    try:
        yield record
    finally:
        lite._mlir_quantize = original


def convert_tflite(
    saved_model: Path,
    *,
    int8: bool,
    representative: Sequence[dict[str, np.ndarray]] = (),
    per_channel: bool = True,
    percentile: float | None = None,
    output_percentile: float | None = None,
    calibration: dict[str, Any] | None = None,
) -> bytes:
    """The FP32 or full-integer INT8 ``.tflite`` of ``saved_model`` (float32 I/O).

    INT8 activation ranges are TFLite's min-max, or with ``percentile`` (e.g. 99.999) the
    percentile ranges of :func:`percentile_ranges`; ``calibration`` (a dict) receives what was
    done.
    """
    tf = import_tensorflow()

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), [SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if int8:
        if not representative:
            raise ConversionError(f"{saved_model}: no calibration inputs for INT8")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: iter(representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
        converter._experimental_disable_per_channel = not per_channel
    try:
        with (
            no_network(),
            _quiet(),
            _calibration_ranges(
                representative, percentile if int8 else None, output_percentile
            ) as record,
        ):
            content = bytes(converter.convert())
        if calibration is not None:
            calibration.update(record)
        return content
    except NetworkBlocked as err:
        raise ConversionError(
            f"{saved_model}: the TFLite converter tried to reach the network: {err}"
        ) from err
    except Exception as err:  # TF raises ConverterError and friends
        text = str(err).strip().splitlines()
        raise ConversionError(
            f"{saved_model}: TFLite conversion ({'INT8' if int8 else 'FP32'}) failed: "
            f"{type(err).__name__}: {' | '.join(text[-6:])}"
        ) from err


# --- binding ------------------------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.mean((ref.astype(np.float64) - test) ** 2))
    signal = float(np.mean(ref.astype(np.float64) ** 2))
    if noise == 0:
        return 100.0
    return float(min(100.0, 10 * np.log10(max(signal, 1e-30) / noise)))


def _perms_to(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, ...]]:
    """Axis permutations p with ``tuple(src[i] for i in p) == dst``, batch axis first."""
    return [
        p
        for p in itertools.permutations(range(len(src)))
        if p[0] == 0 and tuple(src[i] for i in p) == tuple(dst)
    ]


def _run_tflite(interp: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    runner = interp.get_signature_runner(SIGNATURE)
    return {k: np.array(v) for k, v in runner(**feeds).items()}


def _run_onnx(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def _interpreter(content: bytes, threads: int = 1) -> Any:
    """A LiteRT interpreter on ``content`` (XNNPACK, as the runner runs it), tensors allocated."""
    interp = _model(content, threads, delegates=True)
    interp.allocate_tensors()
    return interp


def bind_io(
    onnx_path: Path,
    fp32: bytes,
    samples: Sequence[Mapping[str, np.ndarray]],
    rows: int,
) -> dict[str, Any]:
    """The verified input/output binding of the FP32 ``.tflite`` to its ONNX graph (sidecar)."""
    interp = _interpreter(fp32)
    runner = interp.get_signature_runner(SIGNATURE)
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    onnx_inputs, onnx_outputs = _onnx_io(onnx_path)
    batch = _batches(samples, rows)[:BINDING_SAMPLES]

    # inputs: signature key of the same name (onnx2tf keeps them), permutation by shape, and by
    # numbers when the shape allows several (square images: NHWC or NWHC)
    input_choices: dict[str, list[tuple[int, ...]]] = {}
    in_keys: dict[str, str] = {}
    for name, _ in onnx_inputs:
        key = name if name in in_details else _sanitized(name, in_details)
        shape = batch[0][name].shape
        perms = _perms_to(shape, tuple(in_details[key]["shape"]))
        if not perms:
            raise ConversionError(
                f"{onnx_path}: input {name} {tuple(shape)} matches no axis order of the LiteRT "
                f"input {key} {tuple(in_details[key]['shape'])}"
            )
        in_keys[name], input_choices[name] = key, perms
    references = [_run_onnx(onnx_path, feeds) for feeds in batch]

    best: tuple[float, dict[str, Any]] | None = None
    for combo in itertools.product(*input_choices.values()):
        in_perm = dict(zip(input_choices, combo, strict=True))
        results = [
            _run_tflite(
                interp,
                {in_keys[n]: np.ascontiguousarray(np.transpose(f[n], in_perm[n])) for n in in_keys},
            )
            for f in batch
        ]
        outputs, worst = _bind_outputs(onnx_path, onnx_outputs, references, results, out_details)
        if best is None or worst > best[0]:
            best = (worst, {"in_perm": in_perm, "outputs": outputs})
    assert best is not None
    worst, chosen = best
    if worst < MIN_FP32_COSINE:
        raise ConversionError(
            f"{onnx_path}: the FP32 .tflite does not reproduce ONNX Runtime (lowest output cosine "
            f"{worst:.6f} < {MIN_FP32_COSINE}); the conversion is wrong - report the graph"
        )
    return {
        "format": IO_FORMAT,
        "version": 1,
        "signature": SIGNATURE,
        "batch": rows,
        "inputs": [
            {
                "name": n,
                "key": in_keys[n],
                "perm": list(chosen["in_perm"][n]),
                "tflite_shape": [int(d) for d in in_details[in_keys[n]]["shape"]],
            }
            for n in in_keys
        ],
        "outputs": chosen["outputs"],
        "io_types": "float32 in and out; the model quantizes/dequantizes at its boundary",
        "verified": {"fp32_min_cosine": round(worst, 6), "samples": len(batch)},
    }


def _sanitized(name: str, details: Mapping[str, Any]) -> str:
    """The signature key onnx2tf made of ONNX name ``name`` (it may replace ':' and '/')."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)
    for key in details:
        if key == cleaned or key.rstrip("_0123456789:") == cleaned:
            return key
    if len(details) == 1:
        return next(iter(details))
    raise ConversionError(f"input {name!r} has no signature key among {sorted(details)}")


def _bind_outputs(
    onnx_path: Path,
    names: Sequence[str],
    references: Sequence[Mapping[str, np.ndarray]],
    results: Sequence[Mapping[str, np.ndarray]],
    out_details: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], float]:
    """Each ONNX output's (key, perm) among the LiteRT outputs, by value; worst cosine."""
    bound, used, worst = [], set(), 1.0
    for name in names:
        ref_shape = references[0][name].shape
        scores = []
        for key in out_details:
            for perm in _perms_to(ref_shape, results[0][key].shape):
                cos = min(
                    _cosine(ref[name], np.transpose(res[key], np.argsort(perm)))
                    for ref, res in zip(references, results, strict=True)
                )
                scores.append((cos, key, perm))
        if not scores:
            raise ConversionError(
                f"{onnx_path}: ONNX output {name} {ref_shape} has no LiteRT output of the same "
                f"size (LiteRT outputs: { ({k: v.shape for k, v in results[0].items()}) })"
            )
        scores.sort(key=lambda s: -s[0])
        cos, key, perm = scores[0]
        if key in used:
            raise ConversionError(
                f"{onnx_path}: LiteRT output {key} matches two ONNX outputs best; cannot bind"
            )
        used.add(key)
        worst = min(worst, cos)
        bound.append(
            {
                "name": name,
                "key": key,
                "perm": list(perm),
                "tflite_shape": [int(d) for d in results[0][key].shape],
                "by_name": key == name,
                "fp32_cosine": round(cos, 6),
            }
        )
    return bound, worst


def _batches(samples: Sequence[Mapping[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
    """Samples re-cut to exactly ``rows`` rows (as the static LiteRT graph takes them)."""
    names = list(samples[0])
    stacked = {
        n: np.concatenate([np.asarray(s[n], np.float32) for s in samples if s[n].shape[0]])
        for n in names
    }
    total = next(iter(stacked.values())).shape[0]
    out = []
    for start in range(0, total, rows):
        idx = np.arange(start, start + rows) % total
        out.append({n: np.ascontiguousarray(v[idx]) for n, v in stacked.items()})
    return out


def measure_parity(
    onnx_path: Path,
    content: bytes,
    io_spec: Mapping[str, Any],
    samples: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, Any]:
    """Cosine/SNR of every bound output of ``content`` against ONNX Runtime FP32, and whether
    each bound output is closer to its own ONNX output than to any other of the same shape."""
    interp = _interpreter(content)
    batch = _batches(samples, int(io_spec["batch"]))[:PARITY_SAMPLES]
    per_output: dict[str, dict[str, list[float]]] = {}
    misbound = []
    for feeds in batch:
        ref = _run_onnx(onnx_path, feeds)
        raw = _run_tflite(
            interp,
            {
                b["key"]: np.ascontiguousarray(np.transpose(feeds[b["name"]], b["perm"]))
                for b in io_spec["inputs"]
            },
        )
        for b in io_spec["outputs"]:
            got = np.transpose(raw[b["key"]], np.argsort(b["perm"]))
            if got.shape != ref[b["name"]].shape:
                misbound.append(b["name"])
                continue
            stats = per_output.setdefault(b["name"], {"cosine": [], "snr_db": []})
            cos = _cosine(ref[b["name"]], got)
            stats["cosine"].append(cos)
            stats["snr_db"].append(_snr_db(ref[b["name"]], got))
            rivals = [n for n in ref if n != b["name"] and ref[n].shape == got.shape]
            if any(_cosine(ref[n], got) > cos for n in rivals):
                misbound.append(b["name"])
    outputs = {
        n: {
            "cosine": round(float(np.mean(s["cosine"])), 6),
            "min_cosine": round(float(np.min(s["cosine"])), 6),
            "snr_db": round(float(np.mean(s["snr_db"])), 2),
        }
        for n, s in per_output.items()
    }
    return {
        "samples": len(batch),
        "outputs": outputs,
        "min_cosine": min(o["min_cosine"] for o in outputs.values()),
        "min_snr_db": min(o["snr_db"] for o in outputs.values()),
        "misbound_outputs": sorted(set(misbound)),
    }


# --- inspection ---------------------------------------------------------------------------------


# The builtin ops LiteRT's GPU delegate has an op parser for (NewOperationParser in
# tensorflow/lite/delegates/gpu/common/model_builder.cc, TF 2.21; QUANTIZE/DEQUANTIZE with its
# quantized-model support, on by default). TF's own analyzer
# (tf.lite.experimental.Analyzer.analyze(gpu_compatibility=True)) reported even a Flex-op model
# as compatible in TF 2.21, so the check is made against this table; the delegate cannot run on
# the build host (no mobile GPU), so the table is what the build can know.
GPU_DELEGATE_OPS = frozenset(
    {
        "ABS",
        "ADD",
        "AVERAGE_POOL_2D",
        "BATCH_MATMUL",
        "CONCATENATION",
        "CONV_2D",
        "COS",
        "DEPTHWISE_CONV_2D",
        "DEPTH_TO_SPACE",
        "DEQUANTIZE",
        "DIV",
        "ELU",
        "EXP",
        "FULLY_CONNECTED",
        "HARD_SWISH",
        "LEAKY_RELU",
        "LOG",
        "LOGISTIC",
        "LSTM",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MIRROR_PAD",
        "MUL",
        "NEG",
        "PACK",
        "PAD",
        "POW",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "REDUCE_PROD",
        "RELU",
        "RELU6",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SIN",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT_V",
        "SQRT",
        "SQUARE",
        "SQUARED_DIFFERENCE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
    }
)


def _model(content: bytes, threads: int = 1, *, delegates: bool) -> Any:
    from ai_edge_litert import interpreter as litert

    resolver = (
        litert.OpResolverType.AUTO
        if delegates
        else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    return litert.Interpreter(
        model_content=content, num_threads=threads, experimental_op_resolver_type=resolver
    )


def xnnpack_partitions(content: bytes, threads: int = 1) -> dict[str, Any]:
    """How much of the graph LiteRT's XNNPACK delegate takes on this host.

    With the default delegates applied, each XNNPACK partition is one ``DELEGATE`` node whose
    inputs and outputs bound it; the ops of a partition are found by walking back from its
    outputs to its inputs. Ops outside every partition run on LiteRT's builtin kernels.
    """
    interp = _model(content, threads, delegates=True)
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    plain = [op for op in ops if op["op_name"] != "DELEGATE"]
    producer = {int(t): op["index"] for op in plain for t in op["outputs"]}
    by_index = {op["index"]: op for op in plain}
    members: set[int] = set()
    partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
    for part in partitions:
        bound = {int(t) for t in part["inputs"]}
        stack = [int(t) for t in part["outputs"]]
        while stack:
            t = stack.pop()
            if t in bound or t not in producer or producer[t] in members:
                continue
            members.add(producer[t])
            stack.extend(int(x) for x in by_index[producer[t]]["inputs"] if int(x) >= 0)
    left = Counter(op["op_name"] for op in plain if op["index"] not in members)
    return {
        "delegate": "XNNPACK",
        "total_nodes": len(plain),
        "delegated_nodes": len(members),
        "partitions": len(partitions),
        "not_delegated": dict(sorted(left.items())),
        "host": platform.machine(),
    }


def gpu_delegate_report(op_counts: Mapping[str, int], dynamic: Sequence[str]) -> dict[str, Any]:
    """Whether LiteRT's GPU delegate could take the whole graph: ops it has no parser for
    (:data:`GPU_DELEGATE_OPS`) and dynamic tensors (it needs static shapes)."""
    incompatible = {op: n for op, n in sorted(op_counts.items()) if op not in GPU_DELEGATE_OPS}
    reasons = [f"{op} x{n}: no GPU delegate kernel" for op, n in incompatible.items()]
    if dynamic:
        reasons.append(
            f"dynamic tensors ({', '.join(dynamic[:3])}): the GPU delegate needs static shapes"
        )
    return {
        "compatible": not reasons,
        "incompatible_ops": sorted(incompatible),
        "reasons": reasons,
        "source": "LiteRT GPU delegate op parsers (model_builder.cc, TF 2.21), not run here",
    }


def inspect_tflite(content: bytes, *, int8: bool, threads: int = 1) -> dict[str, Any]:
    """Ops, dtypes and delegate report of one ``.tflite``; ``problems`` lists what is wrong.

    Problems: non-builtin ops (Flex/Select-TF ``Flex*`` ops or custom ops), tensors with a
    dynamic (-1) dimension, and for ``int8`` any weight of a Conv/FC op that is not int8 or any
    float activation between the boundary QUANTIZE/DEQUANTIZE ops. Each names the ops/tensors.
    """
    interp = _model(content, delegates=False)
    ops = interp._get_ops_details()
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    counts = Counter(op["op_name"] for op in ops)
    problems = []
    flex = sorted(
        n for n in counts if n.startswith("Flex") or not n.isupper() or n in ("CUSTOM", "DELEGATE")
    )
    if flex:
        problems.append(f"non-builtin ops (Flex/Select-TF or custom): {', '.join(flex)}")
    dynamic = sorted(
        t["name"]
        for t in tensors.values()
        if any(int(d) < 0 for d in t.get("shape_signature", t["shape"]))
    )
    if dynamic:
        problems.append(f"dynamic tensors (a -1 dimension): {', '.join(dynamic[:5])}")
    float_weights, float_activations = [], Counter()
    if int8:
        for op in ops:
            name = op["op_name"]
            if name in WEIGHT_OPS:
                w = tensors[int(op["inputs"][WEIGHT_OPS[name]])]
                if np.dtype(w["dtype"]) != np.int8:
                    float_weights.append(f"{name}:{w['name']}")
            if name in BOUNDARY_OPS:
                continue
            for t in op["outputs"]:
                if np.dtype(tensors[int(t)]["dtype"]).kind == "f":
                    float_activations[name] += 1
        if float_weights:
            problems.append(
                f"{len(float_weights)} weight tensors not int8: " + ", ".join(float_weights[:5])
            )
        if float_activations:
            problems.append(
                "float activations out of "
                + ", ".join(f"{k} x{v}" for k, v in sorted(float_activations.items()))
            )
    weight_ops = sum(counts[n] for n in WEIGHT_OPS)
    if flex:  # LiteRT cannot allocate a graph with Flex ops: no XNNPACK figures
        xnnpack: dict[str, Any] = {
            "partitions": None,
            "delegated_nodes": None,
            "total_nodes": len(ops),
            "note": "not loadable: " + flex[0],
        }
    else:
        xnnpack = xnnpack_partitions(content, threads)
    inputs = interp.get_input_details()
    outputs = interp.get_output_details()
    return {
        "op_counts": dict(sorted(counts.items())),
        "ops_total": len(ops),
        "builtin_only": not flex,
        "non_builtin_ops": flex,
        "dynamic_tensors": dynamic,
        "full_integer": int8 and not float_weights and not float_activations,
        "weight_ops": weight_ops,
        "int8_weight_ops": weight_ops - len(float_weights) if int8 else 0,
        "float_activation_ops": dict(float_activations),
        "input_types": [str(np.dtype(d["dtype"])) for d in inputs],
        "output_types": [str(np.dtype(d["dtype"])) for d in outputs],
        "xnnpack": xnnpack,
        "gpu_delegate": gpu_delegate_report(counts, dynamic),
        "problems": problems,
    }


def check_deployable(graph: str, checks: Mapping[str, Mapping[str, Any]]) -> None:
    """ConversionError naming every problem :func:`inspect_tflite` found, per precision."""
    problems = [
        f"{precision} {graph}.tflite: {p}" for precision, c in checks.items() for p in c["problems"]
    ]
    if problems:
        raise ConversionError(
            "; ".join(problems) + " - the graph cannot be shipped as built "
            "(the mobile target ships builtin-op, static-shape graphs only)"
        )


def check_gpu_delegate(reports: Mapping[str, Mapping[str, Any]], *, profile: str = "") -> None:
    """ConversionError naming, per graph, the ops LiteRT's GPU delegate cannot run.

    Judged from each INT8 graph's op counts and dynamic tensors with the current
    :data:`GPU_DELEGATE_OPS`, so that a quantize report from the cache is judged like a new one.
    """
    verdicts = {
        g: gpu_delegate_report(r["ops"]["int8"]["op_counts"], r["ops"]["int8"]["dynamic_tensors"])
        for g, r in reports.items()
    }
    failing = {g: v for g, v in verdicts.items() if not v["compatible"]}
    if failing:
        detail = "; ".join(f"{g}: {', '.join(v['reasons'])}" for g, v in failing.items())
        raise ConversionError(
            f"the profile {profile or '(given)'} requires LiteRT's GPU delegate, which cannot run "
            f'the whole INT8 graph: {detail}. Use a profile with "require_gpu_delegate": false '
            "(the graphs then run on XNNPACK), or change the model so these ops are not needed"
        )


def check_profile(profile: Any, report: Mapping[str, Any]) -> None:
    """The mobile target's ``check_profile`` hook: a profile with ``require_gpu_delegate`` fails
    the build, naming the ops, when a converted graph has ops the GPU delegate cannot run."""
    if getattr(profile.runtime, "require_gpu_delegate", False):
        check_gpu_delegate(report["graphs"], profile=profile.name)


# --- the quantizer ------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def head_rows(graph: str, spec: Mapping[str, Any]) -> int | None:
    """Static RoI rows of a head graph (None: the graph has no RoI axis)."""
    if graph == "box_head":
        return int(spec["rpn"]["post_nms_top_n"])
    if graph == "mask_head":
        return min(MASK_ROWS, int(spec["roi_heads"]["detections_per_img"]))
    return None


def convert_graph(
    graph: str,
    onnx_path: Path,
    spec: Mapping[str, Any],
    samples: Sequence[Mapping[str, np.ndarray]],
    settings: QuantizationSettings,
    out_dir: Path,
    work: Path,
) -> dict[str, Any]:
    """One graph: SavedModel, FP32 and INT8 ``.tflite`` with sidecars, checks; its report."""
    import onnx

    from targets.ort_quantize import check_quantizable

    t0 = time.perf_counter()
    check_quantizable(onnx.load(str(onnx_path), load_external_data=False), onnx_path)
    rows = head_rows(graph, spec)
    saved, rewrites = to_saved_model(onnx_path, work, rows, samples)
    rows = rows or 1
    fp32 = convert_tflite(saved, int8=False)
    io_spec = bind_io(onnx_path, fp32, samples, rows)
    keys = {b["name"]: b["key"] for b in io_spec["inputs"]}
    perms = {b["name"]: b["perm"] for b in io_spec["inputs"]}
    representative = list(_representative(samples, keys, perms, rows))
    # activation ranges: min-max, or the percentile of the inner activations (the profile's and
    # PERCENTILE_CANDIDATES; the outputs always at the profile's) whose INT8 graph is closest to
    # ONNX Runtime FP32 on the calibration inputs (mean SNR over the outputs)
    percentiles: list[float | None] = [None]
    if settings.calibrate_method == "percentile":
        percentiles = sorted({settings.percentile, *PERCENTILE_CANDIDATES}, reverse=True)
    tried = []
    for percentile in percentiles:
        calibration: dict[str, Any] = {}
        content = convert_tflite(
            saved,
            int8=True,
            representative=representative,
            per_channel=settings.per_channel,
            percentile=percentile,
            output_percentile=settings.percentile,
            calibration=calibration,
        )
        result = measure_parity(onnx_path, content, io_spec, samples)
        snr = float(np.mean([o["snr_db"] for o in result["outputs"].values()]))
        tried.append((snr, percentile, content, result, calibration))
    snr, _, int8, int8_parity, calibration = max(tried, key=lambda t: t[0])
    calibration["search"] = [
        {"percentile": t[1], "mean_snr_db": round(t[0], 2), "min_cosine": t[3]["min_cosine"]}
        for t in tried
    ]
    parity = {"fp32": measure_parity(onnx_path, fp32, io_spec, samples), "int8": int8_parity}
    for precision, result in parity.items():
        if result["misbound_outputs"]:
            raise ConversionError(
                f"{onnx_path}: outputs {result['misbound_outputs']} of the {precision.upper()} "
                ".tflite, bound by signature key, are closer to another ONNX output than to their "
                "own (or have another shape); the binding is wrong - report the graph"
            )
    checks = {"fp32": inspect_tflite(fp32, int8=False), "int8": inspect_tflite(int8, int8=True)}
    check_deployable(graph, checks)

    files = {}
    for precision, content in (("fp32", fp32), ("int8", int8)):
        folder = out_dir / "models" / precision
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / f"{graph}.tflite", content)
        sidecar = {**io_spec, "precision": precision}
        _write_atomic(folder / f"{graph}.io.json", (json.dumps(sidecar, indent=2) + "\n").encode())
        files[precision] = {
            "path": f"models/{precision}/{graph}.tflite",
            "bytes": len(content),
            "sha256": sha256_file(folder / f"{graph}.tflite"),
        }
    return {
        "graph": graph,
        "onnx_path": str(onnx_path),
        "onnx_bytes": onnx_path.stat().st_size,
        "files": files,
        "rows_per_call": rows,
        "onnx_rewrites": rewrites,
        "activation_ranges": calibration,
        "calibration_samples": len(samples),
        "calibration_batches": len(representative),
        "io": {k: io_spec[k] for k in ("inputs", "outputs", "io_types", "verified")},
        "parity_vs_onnx": parity,
        "ops": checks,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def quantize_graphs(
    fp32_dir: Path,
    out_dir: Path,
    calibration_inputs: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    settings: QuantizationSettings = QuantizationSettings(),
) -> dict[str, Any]:
    """FP32 and full-integer INT8 ``.tflite`` versions of the static graphs in ``fp32_dir``.

    ``calibration_inputs`` maps each graph name to its captured input dicts (see
    :func:`calibration.collect_graph_inputs`). Returns the report: converter versions, settings,
    per graph the files, the verified I/O binding, parity of FP32 and INT8 against ONNX Runtime,
    and the ops report.
    """
    check_settings(settings)
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    models = fp32_dir / "models" / "fp32"
    spec = fp32_dir / "graph_spec.json"
    if not spec.is_file():
        raise ConversionError(f"{spec}: graph spec not found; run the export stage first")
    found = sorted(p.stem for p in models.glob("*.onnx"))
    if not found:
        raise ConversionError(f"{models}: no FP32 graphs (*.onnx) to convert; export first")
    graphs = [g for g in GRAPH_ORDER if g in found] + [g for g in found if g not in GRAPH_ORDER]
    samples: dict[str, list[Mapping[str, np.ndarray]]] = {}
    for graph in graphs:
        given = list(calibration_inputs.get(graph, ()))
        samples[graph] = [s for s in given if all(v.shape[0] > 0 for v in s.values())]
        if not samples[graph]:
            raise ConversionError(
                f"no usable calibration inputs for graph {graph} of {models} ({len(given)} given,"
                " all empty or none); collect them with calibration.collect_graph_inputs on the "
                "FP32 engine, on images where the model finds objects"
            )

    graph_spec = json.loads(spec.read_text())
    t0 = time.perf_counter()
    log.info(
        "converting %s to LiteRT FP32 + full-integer INT8 (onnx2tf + TFLiteConverter, %s, %s)",
        ", ".join(graphs),
        "min-max" if settings.calibrate_method == "minmax" else f"percentile {settings.percentile}",
        "per-channel" if settings.per_channel else "per-tensor",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    with tempfile.TemporaryDirectory(prefix=".tflite-", dir=out_dir) as tmp:
        for graph in graphs:
            r = reports[graph] = convert_graph(
                graph,
                models / f"{graph}.onnx",
                graph_spec,
                samples[graph],
                settings,
                out_dir,
                Path(tmp),
            )
            x = r["ops"]["int8"]["xnnpack"]
            log.info(
                "%s: INT8 %d bytes, min cosine vs ONNX %.4f (FP32 .tflite %.6f), "
                "XNNPACK %s/%s nodes in %s partitions, %.1fs",
                graph,
                r["files"]["int8"]["bytes"],
                r["parity_vs_onnx"]["int8"]["min_cosine"],
                r["parity_vs_onnx"]["fp32"]["min_cosine"],
                x["delegated_nodes"],
                x["total_nodes"],
                x["partitions"],
                r["seconds"],
            )
    if out_dir.resolve() != fp32_dir.resolve():
        shutil.copyfile(spec, out_dir / "graph_spec.json")
    ops_report = write_ops_report(out_dir / "models" / "int8" / OPS_REPORT, reports)
    return {
        "format": "tflite-full-integer-int8",
        "quantizer": "onnx2tf (ONNX -> SavedModel) + tf.lite.TFLiteConverter "
        "(TFLITE_BUILTINS_INT8, representative dataset)",
        "converter_choice": "TFLiteConverter on onnx2tf's SavedModel: exact FP32 conversion "
        "(cosine in parity_vs_onnx.fp32), offline by design, full-integer "
        "int8 with the captured calibration inputs",
        "io_types": "float32 inputs and outputs; quantize/dequantize inside the model with its "
        "own scales and zero points",
        "settings": settings.to_dict(),
        "versions": _versions(),
        "host_machine": platform.machine(),
        "graphs": reports,
        "min_cosine": min(r["parity_vs_onnx"]["int8"]["min_cosine"] for r in reports.values()),
        "builtin_ops_only": ops_report["builtin_ops_only"],
        "full_integer": ops_report["full_integer"],
        "gpu_delegate_compatible": ops_report["gpu_delegate_compatible"],
        "ops_report": f"models/int8/{OPS_REPORT}",
        "markdown": ops_markdown(reports),
        "limitations": _limitations(reports),
        "out_dir": str(out_dir),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def ops_markdown(reports: Mapping[str, Any]) -> list[str]:
    """The ops report as a report.md section: one row per graph and precision."""
    lines = [
        "## LiteRT ops (models/int8/ops_report.json)",
        "",
        "| graph | precision | ops | builtin only | non-builtin ops | dynamic tensors | "
        "full integer | XNNPACK nodes | XNNPACK partitions | GPU delegate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for graph, r in reports.items():
        for precision in ("fp32", "int8"):
            ops = r["ops"][precision]
            x, gpu = ops["xnnpack"], ops["gpu_delegate"]
            lines.append(
                f"| {graph} | {precision} | {sum(ops['op_counts'].values())} | "
                f"{'yes' if ops['builtin_only'] else 'NO'} | "
                f"{', '.join(ops['non_builtin_ops']) or '-'} | "
                f"{len(ops['dynamic_tensors']) or '-'} | "
                f"{'yes' if ops['full_integer'] else 'no'} | "
                f"{x['delegated_nodes']}/{x['total_nodes']} | {x['partitions']} | "
                + ("compatible" if gpu["compatible"]
                   else "not: " + ", ".join(gpu["incompatible_ops"])) + " |"
            )
    return lines


def write_ops_report(path: Path, reports: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's ops report (``models/int8/ops_report.json``): per graph and precision the
    operators, builtin-only, dynamic tensors, full-integer, XNNPACK partitions and GPU-delegate
    compatibility, as :func:`inspect_tflite` found them."""
    keys = (
        "op_counts",
        "builtin_only",
        "non_builtin_ops",
        "dynamic_tensors",
        "full_integer",
        "input_types",
        "output_types",
        "xnnpack",
        "gpu_delegate",
    )
    graphs = {
        g: {p: {k: r["ops"][p][k] for k in keys} for p in ("fp32", "int8")}
        for g, r in reports.items()
    }
    report = {
        "format": "maskedge-litert-ops",
        "version": 1,
        "builtin_ops_only": all(v[p]["builtin_only"] for v in graphs.values() for p in v),
        "full_integer": all(v["int8"]["full_integer"] for v in graphs.values()),
        "no_dynamic_tensors": not any(v[p]["dynamic_tensors"] for v in graphs.values() for p in v),
        "gpu_delegate_compatible": all(
            v["int8"]["gpu_delegate"]["compatible"] for v in graphs.values()
        ),
        "xnnpack_partitions_int8": {
            g: v["int8"]["xnnpack"]["partitions"] for g, v in graphs.items()
        },
        "graphs": graphs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "tensorflow-cpu",
        "tensorflow",
        "onnx2tf",
        "ai-edge-litert",
        "onnx",
        "onnxruntime",
        "tf-keras",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _limitations(reports: Mapping[str, Any]) -> list[str]:
    notes = [
        "Latency is measured on the build host's CPU with XNNPACK, not on a phone; INT8 vs FP32 "
        "speed on an x86 host is not a phone's.",
        "GPU-delegate compatibility is checked against LiteRT's GPU op table, not by running the "
        "GPU delegate (no phone GPU here); the Core ML delegate (iPhone) is not validated.",
        "Full-integer INT8 calibrated on the calibration set (activation ranges: the profile's "
        "calibrate_method, min-max or percentile); nothing is kept in float. "
        "Graph inputs and outputs are float32: each model quantizes its inputs and dequantizes "
        "its outputs with its own scale and zero point (io_types, models/*/<graph>.io.json).",
        "The runner needs ai-edge-litert (wheels for Linux x86_64/aarch64 and macOS); a phone "
        "app runs the same .tflite files with its own LiteRT and must bind outputs by the "
        "signature keys and axis orders in the .io.json files, not by position.",
    ]
    for graph, r in reports.items():
        x = r["ops"]["int8"]["xnnpack"]
        if x["partitions"] and x["partitions"] > 1:
            notes.append(
                f"{graph}: the INT8 graph runs in {x['partitions']} XNNPACK partitions on "
                f"the build host ({x['delegated_nodes']} of {x['total_nodes']} nodes "
                "delegated); the rest runs on LiteRT's builtin kernels"
            )
        gpu = r["ops"]["int8"]["gpu_delegate"]
        if not gpu["compatible"]:
            notes.append(
                f"{graph}: LiteRT's GPU delegate cannot take the whole graph "
                f"({'; '.join(gpu['reasons'])}); the bundle targets CPU/XNNPACK"
            )
        if r["rows_per_call"] > 1:
            notes.append(
                f"{graph}: static {r['rows_per_call']} RoIs per call; more RoIs run in "
                "several calls, fewer are zero-padded"
            )
    return notes
