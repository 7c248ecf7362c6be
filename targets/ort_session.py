"""ONNX Runtime session options as a profile's ``runtime`` section, for every ORT target.

The options are handed to the runner's ORT backend as a plain dict
(``maskedge_runner.backends.make_backend("onnxruntime", path, options)``) and to the latency
benchmark as JSON, so the profile, the host benchmark and the device run the same settings.

Reads and writes nothing. Known limit: execution providers other than ``CPUExecutionProvider`` can
be named (a Jetson profile lists CUDA), but maskedge validates only the CPU provider here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from targets.profiles import check_runtime_field

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")
KNOWN_PROVIDERS = (
    "CPUExecutionProvider",
    "XnnpackExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
)


@dataclass(frozen=True)
class OrtSessionOptions:
    """``intra_op_num_threads``/``inter_op_num_threads`` as ORT's SessionOptions take them (0 lets
    ORT choose, which maskedge profiles never do: the benchmark records what ran)."""

    intra_op_num_threads: int
    inter_op_num_threads: int = 1
    graph_optimization_level: str = "all"
    execution_mode: str = "sequential"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # idle pool threads busy-wait after each run by default and take the cores from the numpy
    # host code between graphs: measured 2-3x slower end to end on a 2-core host with it on
    allow_spinning: bool = False

    def __post_init__(self) -> None:
        check_runtime_field(
            self.intra_op_num_threads >= 1,
            "intra_op_num_threads",
            self.intra_op_num_threads,
            "must be >= 1 (threads for one operator)",
        )
        check_runtime_field(
            self.inter_op_num_threads >= 1,
            "inter_op_num_threads",
            self.inter_op_num_threads,
            "must be >= 1",
        )
        check_runtime_field(
            self.graph_optimization_level in OPTIMIZATION_LEVELS,
            "graph_optimization_level",
            self.graph_optimization_level,
            f"must be one of {', '.join(OPTIMIZATION_LEVELS)}",
        )
        check_runtime_field(
            self.execution_mode in EXECUTION_MODES,
            "execution_mode",
            self.execution_mode,
            f"must be one of {', '.join(EXECUTION_MODES)}",
        )
        check_runtime_field(
            len(self.providers) >= 1,
            "providers",
            list(self.providers),
            "must name at least one execution provider",
        )
        for provider in self.providers:
            check_runtime_field(
                provider in KNOWN_PROVIDERS,
                "providers",
                provider,
                f"is not an ONNX Runtime provider maskedge knows ({', '.join(KNOWN_PROVIDERS)})",
            )

    def to_backend_options(self) -> dict[str, Any]:
        """The dict ``make_backend("onnxruntime", path, options)`` takes."""
        options = asdict(self)
        options["providers"] = list(self.providers)
        return options
