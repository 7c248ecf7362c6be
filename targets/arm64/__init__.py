"""The ``arm64`` target: ONNX Runtime (CPU) on 64-bit Arm boards, QDQ INT8 graphs.

Runtime: the runner's ``onnxruntime`` backend, session options from the profile's ``runtime``
section (:class:`targets.ort_session.OrtSessionOptions`). Quantizer:
:func:`targets.ort_quantize.quantize_graphs`. Profiles: ``profiles/rpi4.json``,
``profiles/rpi5.json`` (default) and ``profiles/jetson_orin_nano.json``.

Known limits: INT8 speed-ups on Arm depend on the Armv8.2 dot-product instructions (``dotprod``),
which the Raspberry Pi 4's Cortex-A72 lacks; the Jetson's GPU (CUDA/TensorRT providers) is
described in its profile but not validated by maskedge - the bundle runs on its CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from targets import Target
from targets.ort_quantize import quantize_graphs
from targets.ort_session import OrtSessionOptions

ISA_FEATURES = ("neon", "fp16", "dotprod", "i8mm", "sve")

TARGET = Target(
    name="arm64",
    description="64-bit Arm boards (Raspberry Pi, Jetson CPU): ONNX Runtime, QDQ INT8",
    backend="onnxruntime",
    quantize=quantize_graphs,
    runtime_options=OrtSessionOptions,
    isa_features=ISA_FEATURES,
    profiles_dir=Path(__file__).resolve().parent / "profiles",
    default_profile="rpi5",
    aliases=("aarch64", "arm", "armv8"),
    machines=("aarch64", "arm64"),
    extras="runner-ort",
)
