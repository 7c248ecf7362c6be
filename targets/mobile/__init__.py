"""The ``mobile`` target: LiteRT (TensorFlow Lite) on Android and iOS phones, full-integer INT8.

Runtime: the runner's ``litert`` backend (``ai_edge_litert.interpreter``, XNNPACK), options from
the profile's ``runtime`` section (:class:`targets.mobile.options.LiteRtOptions`). Quantizer:
:func:`targets.mobile.tflite_convert.quantize_graphs` - each static ONNX graph to an FP32
``.tflite`` and a full-integer INT8 ``.tflite`` (int8 weights and activations, calibrated on the
calibration set; the heads on real pooled RoI features). Profiles: ``profiles/pixel7.json``
(default, mid-range Android), ``profiles/android_flagship.json`` and ``profiles/iphone.json``.

Known limits: latency is measured on the build host (x86_64 or an Arm Linux machine), never on a
phone; it is reported, not gated. The iPhone profile describes LiteRT's CPU/XNNPACK path; the Core
ML and GPU delegates are not validated here (the build reports which ops the GPU delegate could
take).
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
