"""OpenVINO CPU compile options as a profile's ``runtime`` section, for every OpenVINO target.

The options are handed to the runner's OpenVINO backend as a plain dict
(``maskedge_runner.backends.make_backend("openvino", path, options)``) and to the latency
benchmark as JSON, so the profile, the host benchmark and the device run the same settings.

Keys (the OpenVINO property each sets on ``Core.compile_model(model, "CPU", config)``):

- ``performance_hint``: ``LATENCY`` (one image at a time, the runner's case) or ``THROUGHPUT``
  (``PERFORMANCE_HINT``);
- ``num_streams``: parallel inference streams (``NUM_STREAMS``); 1 for one image at a time;
- ``inference_num_threads``: threads of the CPU plugin (``INFERENCE_NUM_THREADS``); maskedge
  profiles never leave it to OpenVINO, so the benchmark records what ran;
- ``enable_cpu_pinning``: pin the inference threads to cores (``ENABLE_CPU_PINNING``);
- ``scheduling_core_type``: ``ANY_CORE``, ``PCORE_ONLY`` or ``ECORE_ONLY`` on hybrid (P/E core)
  Intel CPUs (``SCHEDULING_CORE_TYPE``);
- ``inference_precision``: ``f32`` (default) or ``bf16``/``f16`` (``INFERENCE_PRECISION_HINT``).
  OpenVINO runs FP32 graphs in bf16 on CPUs with AMX/AVX-512 BF16 unless told ``f32``; maskedge
  keeps ``f32`` so that the FP32 reference is FP32 and the INT8 graph's float parts match it.

Reads and writes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from targets.profiles import check_runtime_field

PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
CORE_TYPES = ("ANY_CORE", "PCORE_ONLY", "ECORE_ONLY")
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")


@dataclass(frozen=True)
class OpenVinoOptions:
    """The OpenVINO CPU plugin's knobs maskedge sets (see the module docstring)."""

    inference_num_threads: int
    performance_hint: str = "LATENCY"
    num_streams: int = 1
    enable_cpu_pinning: bool = False
    scheduling_core_type: str = "ANY_CORE"
    inference_precision: str = "f32"

    def __post_init__(self) -> None:
        check_runtime_field(
            self.inference_num_threads >= 1,
            "inference_num_threads",
            self.inference_num_threads,
            "must be >= 1 (threads of the CPU plugin)",
        )
        check_runtime_field(
            self.performance_hint in PERFORMANCE_HINTS,
            "performance_hint",
            self.performance_hint,
            f"must be one of {', '.join(PERFORMANCE_HINTS)}",
        )
        check_runtime_field(
            1 <= self.num_streams <= self.inference_num_threads,
            "num_streams",
            self.num_streams,
            f"must be between 1 and inference_num_threads ({self.inference_num_threads})",
        )
        check_runtime_field(
            self.scheduling_core_type in CORE_TYPES,
            "scheduling_core_type",
            self.scheduling_core_type,
            f"must be one of {', '.join(CORE_TYPES)}",
        )
        check_runtime_field(
            self.inference_precision in INFERENCE_PRECISIONS,
            "inference_precision",
            self.inference_precision,
            f"must be one of {', '.join(INFERENCE_PRECISIONS)}",
        )

    def to_backend_options(self) -> dict[str, Any]:
        """The dict ``make_backend("openvino", path, options)`` takes."""
        return asdict(self)
