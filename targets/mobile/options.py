"""LiteRT interpreter options as a profile's ``runtime`` section, for the mobile target.

The options are handed to the runner's LiteRT backend as a plain dict
(``maskedge_runner.backends.make_backend("litert", path, options)``) and to the latency benchmark
as JSON, so the profile, the host benchmark and the device run the same settings.

``require_gpu_delegate`` is a build-time requirement, not an interpreter option: when true the
build fails, naming the ops, if LiteRT's GPU-compatibility analysis finds ops the GPU delegate
cannot run (the backend on the host runs the CPU/XNNPACK path either way).

Reads and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from targets.profiles import check_runtime_field


@dataclass(frozen=True)
class LiteRtOptions:
    """``num_threads`` for LiteRT's CPU kernels and XNNPACK; ``use_xnnpack`` selects the XNNPACK
    delegate (LiteRT's default CPU path) over the reference builtin kernels."""

    num_threads: int
    use_xnnpack: bool = True
    require_gpu_delegate: bool = False

    def __post_init__(self) -> None:
        check_runtime_field(
            self.num_threads >= 1,
            "num_threads",
            self.num_threads,
            "must be >= 1 (threads for LiteRT's CPU kernels)",
        )
        check_runtime_field(
            self.num_threads <= 16,
            "num_threads",
            self.num_threads,
            "must be <= 16 (no phone CPU has more cores)",
        )

    def to_backend_options(self) -> dict[str, Any]:
        """The dict ``make_backend("litert", path, options)`` takes."""
        return {"num_threads": self.num_threads, "use_xnnpack": self.use_xnnpack}
