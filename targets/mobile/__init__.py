"""The ``mobile`` target: LiteRT (TensorFlow Lite) on Android and iOS phones, full-integer INT8.

Runtime: the runner's ``litert`` backend (``ai_edge_litert.interpreter``, XNNPACK), options from
the profile's ``runtime`` section (:class:`targets.mobile.options.LiteRtOptions`). Quantizer:
:func:`targets.mobile.tflite_convert.quantize_graphs` - each static ONNX graph to an FP32
``.tflite`` and a full-integer INT8 ``.tflite`` (int8 weights and activations, calibrated on the
calibration set; the heads on real pooled RoI features). Profiles: ``profiles/pixel7.json``
(default, mid-range Android), ``profiles/android_flagship.json`` and ``profiles/iphone.json``.

Converter: onnx2tf (ONNX -> TensorFlow SavedModel, run offline: its simplifier, its own INT8
path and its sample-data download are kept out, every connection refused) then TensorFlow's
``TFLiteConverter`` with ``TFLITE_BUILTINS_INT8`` and a representative dataset of the captured
calibration inputs. Graph I/O stays float32 (the model quantizes and dequantizes at its boundary
with its own scales and zero points); the runner also feeds int8/uint8 I/O with the tensor's
scale and zero point. Outputs are bound by signature key, verified by value at build time
(``<graph>.io.json``). Each bundle carries ``models/int8/ops_report.json``: operators, builtin
ops only, dynamic tensors, full-integer, XNNPACK partitions and GPU-delegate compatibility.

Known limits:

- latency is measured on the build host (x86_64 or an Arm Linux machine) with XNNPACK and the
  profile's threads, never on a phone; it is reported, not gated. On an x86 host INT8 XNNPACK can
  be slower than FP32 (other int8 kernels than a phone's SDOT/SMMLA ones);
- the iPhone profile describes LiteRT's CPU/XNNPACK path; the Core ML delegate is not validated
  here, and neither is the GPU delegate: its compatibility is judged from LiteRT's op table
  (a profile with ``require_gpu_delegate`` fails the build naming the ops it cannot take);
- calibration is min-max only and nothing stays in float (full-integer); profiles must say
  ``calibrate_method: minmax`` and int8 weights and activations;
- the heads run a fixed number of RoIs per call (box head: the RPN's post-NMS count; mask head:
  8), so a call with fewer RoIs computes padding;
- the runner needs ``ai-edge-litert`` (wheels for Linux x86_64/aarch64 and macOS); on a phone
  the app's LiteRT runtime must apply the same boundary rules the ``.io.json`` files describe.
"""

from __future__ import annotations

from pathlib import Path

from targets import Target
from targets.mobile.options import LiteRtOptions
from targets.mobile.tflite_convert import check_profile, quantize_graphs

# Armv8 features phone SoCs differ in; XNNPACK picks its int8 kernels by them at run time
ISA_FEATURES = ("neon", "fp16", "dotprod", "i8mm")

TARGET = Target(
    name="mobile",
    description="Android and iOS phones: LiteRT (TFLite), full-integer INT8, XNNPACK",
    backend="litert",
    quantize=quantize_graphs,
    runtime_options=LiteRtOptions,
    isa_features=ISA_FEATURES,
    profiles_dir=Path(__file__).resolve().parent / "profiles",
    default_profile="pixel7",
    aliases=("tflite", "litert", "android", "ios"),
    # no build host is a phone (an aarch64 Linux box is not one): latency is never gated here
    machines=(),
    extras="runner-litert",
    check_profile=check_profile,
)
