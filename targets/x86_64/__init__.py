"""The ``x86_64`` target: OpenVINO (CPU plugin) on Intel x86-64 machines, NNCF INT8 IR.

Runtime: the runner's ``openvino`` backend, compile options from the profile's ``runtime``
section (:class:`targets.x86_64.ov_options.OpenVinoOptions`: performance hint, streams, inference
threads, CPU pinning, core type, inference precision). Quantizer:
:func:`targets.x86_64.ov_quantize.quantize_graphs` - the three static ONNX graphs converted to
OpenVINO IR (FP32 kept as the reference) and quantized to INT8 with ``nncf.quantize`` on the
calibration inputs. Profiles: ``profiles/laptop_avx2.json`` (default), ``profiles/nuc_i7.json``
and ``profiles/atom_x7425e.json``. Comparison: the build report sets ONNX Runtime (the same FP32
ONNX graphs, and QDQ INT8 from :mod:`targets.ort_quantize`) beside OpenVINO on the same host and
val set (:mod:`targets.x86_64.compare`).

Known limits: INT8 speed-ups on x86 depend on VNNI (AVX-512 VNNI or AVX-VNNI) or AMX; on an
AVX2-only CPU OpenVINO emulates the INT8 dot products with AVX2 and gains less. Figures in the
profiles are from Intel's data sheets, not probed on a device; the build measures on its own host
and records that host's ISA.
"""

from __future__ import annotations

from pathlib import Path

from targets import Target
from targets.x86_64.compare import compare_runtimes
from targets.x86_64.ov_options import OpenVinoOptions
from targets.x86_64.ov_quantize import quantize_graphs

ISA_FEATURES = ("sse4_2", "avx2", "avx512", "vnni", "amx")

TARGET = Target(
    name="x86_64",
    description="Intel x86-64 CPUs (laptops, NUCs, Atom edge boxes): OpenVINO IR, NNCF INT8",
    backend="openvino",
    quantize=quantize_graphs,
    runtime_options=OpenVinoOptions,
    isa_features=ISA_FEATURES,
    profiles_dir=Path(__file__).resolve().parent / "profiles",
    default_profile="laptop_avx2",
    aliases=("intel", "x86", "amd64"),
    machines=("x86_64", "amd64"),
    extras="runner-openvino",
    compare=compare_runtimes,
)
