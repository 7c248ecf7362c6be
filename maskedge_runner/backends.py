"""Runtime backends: one static graph file -> a function from named inputs to named outputs.

A backend is a factory ``(model_path, options) -> GraphFn`` registered in :data:`BACKENDS` under
the runtime's name; the engine only ever calls the function, so another runtime (OpenVINO,
LiteRT) is one more entry here and nothing else changes. Each backend imports its runtime when
it is first used, so the runner imports only the runtime it runs.

``onnxruntime`` options (all optional):

- ``intra_op_num_threads`` / ``inter_op_num_threads``: int >= 0 (0 lets ONNX Runtime choose);
- ``graph_optimization_level``: ``disable``, ``basic``, ``extended`` or ``all`` (default ``all``);
- ``execution_mode``: ``sequential`` (default) or ``parallel``;
- ``providers``: list of execution providers, e.g. ``["CPUExecutionProvider"]``; by default the
  CUDA provider when this onnxruntime build has it, then the CPU provider;
- ``allow_spinning``: bool; whether idle thread-pool threads busy-wait for the next run (ONNX
  Runtime's default: yes). With as many threads as cores, spinning threads compete with the
  numpy host code that runs between the graphs; ``False`` hands the cores back.

``openvino`` options (all optional; the CPU plugin's properties, see
``targets/x86_64/ov_options.py``): ``inference_num_threads``, ``num_streams`` (ints >= 0),
``performance_hint`` (``LATENCY``/``THROUGHPUT``), ``enable_cpu_pinning`` (bool),
``scheduling_core_type`` (``ANY_CORE``/``PCORE_ONLY``/``ECORE_ONLY``) and ``inference_precision``
(``f32``/``bf16``/``f16``; default ``f32``, where OpenVINO itself would pick bf16 on CPUs that
have it). The backend loads the OpenVINO IR (``<graph>.xml`` + ``.bin``) beside
the name graph_spec.json gives (:data:`MODEL_SUFFIXES`).

``litert`` options (all optional; see :mod:`maskedge_runner.litert`): ``num_threads`` (int >= 1)
and ``use_xnnpack`` (bool, default true). The backend loads ``<graph>.tflite`` and its
``<graph>.io.json`` (layout, signature keys and RoI rows per call, verified at build time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GraphFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
BackendFactory = Callable[[Path, Mapping[str, Any]], GraphFn]


class RunnerError(Exception):
    """A bundle, backend or option the runner cannot use; the message says what to do."""


ORT_OPTIONS = (
    "intra_op_num_threads",
    "inter_op_num_threads",
    "graph_optimization_level",
    "execution_mode",
    "providers",
    "allow_spinning",
)
_ORT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_ORT_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


class OrtGraph:
    """One ONNX Runtime session behind the :data:`GraphFn` call signature."""

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.providers = list(session.get_providers())

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise RunnerError(
                f"{self.path.name}: inputs {missing} missing (given {sorted(inputs)})"
            )
        feeds = {n: inputs[n] for n in self.input_names}
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))


def _int_option(options: Mapping[str, Any], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise RunnerError(f"runtime option {key}={value!r}: expected an integer >= 0")
    return int(value)


def _choice(options: Mapping[str, Any], key: str, table: dict[str, str]) -> str | None:
    value = options.get(key)
    if value is None:
        return None
    if value not in table:
        raise RunnerError(f"runtime option {key}={value!r}: expected one of {', '.join(table)}")
    return table[value]


def ort_session_options(options: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """Validated ``onnxruntime.SessionOptions`` and provider list for ``options``."""
    import onnxruntime as ort

    unknown = sorted(set(options) - set(ORT_OPTIONS))
    if unknown:
        raise RunnerError(f"unknown onnxruntime options {unknown}; known: {', '.join(ORT_OPTIONS)}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    intra = _int_option(options, "intra_op_num_threads")
    inter = _int_option(options, "inter_op_num_threads")
    if intra is not None:
        so.intra_op_num_threads = intra
    if inter is not None:
        so.inter_op_num_threads = inter
    level = _choice(options, "graph_optimization_level", _ORT_LEVELS)
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level or "ORT_ENABLE_ALL")
    spinning = options.get("allow_spinning")
    if spinning is not None:
        if not isinstance(spinning, bool):
            raise RunnerError(f"runtime option allow_spinning={spinning!r}: expected true/false")
        for pool in ("intra_op", "inter_op"):
            so.add_session_config_entry(f"session.{pool}.allow_spinning", str(int(spinning)))
    mode = _choice(options, "execution_mode", _ORT_MODES)
    so.execution_mode = getattr(ort.ExecutionMode, mode or "ORT_SEQUENTIAL")

    available = ort.get_available_providers()
    providers = options.get("providers")
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider",) if p in available]
        providers.append("CPUExecutionProvider")
    else:
        if isinstance(providers, str) or not all(isinstance(p, str) for p in providers):
            raise RunnerError(f"runtime option providers={providers!r}: expected a list of names")
        missing = [p for p in providers if p not in available]
        if missing:
            raise RunnerError(
                f"execution providers {missing} are not in this onnxruntime build (available: "
                f"{', '.join(available)}); install the matching onnxruntime package or drop them"
            )
        providers = list(providers)
    return so, providers


def make_onnxruntime(model_path: Path, options: Mapping[str, Any]) -> GraphFn:
    """An ONNX Runtime session for ``model_path`` with ``options`` (see module docstring)."""
    import onnxruntime as ort

    so, providers = ort_session_options(options)
    try:
        session = ort.InferenceSession(str(model_path), so, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise RunnerError(
            f"{model_path}: onnxruntime cannot load this model ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); re-export the "
            "bundle or use the onnxruntime version named in its manifest"
        ) from err
    return OrtGraph(session, Path(model_path))


OPENVINO_OPTIONS = (
    "inference_num_threads",
    "performance_hint",
    "num_streams",
    "enable_cpu_pinning",
    "scheduling_core_type",
    "inference_precision",
)


class OpenVinoGraph:
    """One OpenVINO compiled model (CPU plugin) behind the :data:`GraphFn` call signature.

    Inputs are fed and outputs returned by tensor name (every name an output port carries), so
    the engine reads the same names from an IR as from the ONNX graph it was converted from.
    """

    def __init__(self, compiled: Any, path: Path) -> None:
        self.compiled = compiled
        self.path = path
        self.request = compiled.create_infer_request()
        self.input_names = [port.any_name for port in compiled.inputs]
        self.outputs = [(port, sorted(port.get_names())) for port in compiled.outputs]
        unnamed = [str(port) for port, names in self.outputs if not names]
        if unnamed:
            raise RunnerError(
                f"{path}: outputs without tensor names ({', '.join(unnamed)}); the runner binds "
                "outputs by name - convert the graph with its ONNX output names kept"
            )
        self.output_names = [name for _, names in self.outputs for name in names]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise RunnerError(
                f"{self.path.name}: inputs {missing} missing (given {sorted(inputs)})"
            )
        self.request.infer({n: np.ascontiguousarray(inputs[n]) for n in self.input_names})
        result = {}
        for port, names in self.outputs:
            # the request's buffers are reused by the next call: copy out
            value = np.array(self.request.get_tensor(port).data, copy=True)
            for name in names:
                result[name] = value
        return result


def openvino_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validated OpenVINO CPU ``compile_model`` properties for ``options`` (module docstring)."""
    unknown = sorted(set(options) - set(OPENVINO_OPTIONS))
    if unknown:
        raise RunnerError(
            f"unknown openvino options {unknown}; known: {', '.join(OPENVINO_OPTIONS)}"
        )
    config: dict[str, Any] = {}
    for key, prop in (("inference_num_threads", "INFERENCE_NUM_THREADS"),
                      ("num_streams", "NUM_STREAMS")):
        value = _int_option(options, key)
        if value is not None:
            config[prop] = value
    choices = (
        ("performance_hint", "PERFORMANCE_HINT", ("LATENCY", "THROUGHPUT")),
        ("scheduling_core_type", "SCHEDULING_CORE_TYPE", ("ANY_CORE", "PCORE_ONLY", "ECORE_ONLY")),
        ("inference_precision", "INFERENCE_PRECISION_HINT", ("f32", "bf16", "f16")),
    )
    for key, prop, allowed in choices:
        value = _choice(options, key, {a: a for a in allowed})
        if value is not None:
            config[prop] = value
    pinning = options.get("enable_cpu_pinning")
    if pinning is not None:
        if not isinstance(pinning, bool):
            raise RunnerError(f"runtime option enable_cpu_pinning={pinning!r}: expected true/false")
        config["ENABLE_CPU_PINNING"] = pinning
    # OpenVINO runs FP32 graphs in bf16 on CPUs with AMX/AVX-512 BF16 unless told otherwise
    # (measured: 1.5e-3 max abs difference on a small conv graph); the runner keeps FP32 as FP32
    config.setdefault("INFERENCE_PRECISION_HINT", "f32")
    return config


def make_openvino(model_path: Path, options: Mapping[str, Any]) -> GraphFn:
    """An OpenVINO CPU compiled model for ``model_path`` (IR .xml or .onnx) with ``options``."""
    try:
        import openvino as ov
    except ImportError as err:
        raise RunnerError(
            "the openvino backend needs the openvino package: pip install openvino"
        ) from err

    config = openvino_config(options)
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
    except Exception as err:  # openvino raises RuntimeError/its own types
        raise RunnerError(
            f"{model_path}: openvino cannot load or compile this model ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); re-export the "
            "bundle or use the openvino version named in its manifest"
        ) from err
    return OpenVinoGraph(compiled, Path(model_path))


def make_litert(model_path: Path, options: Mapping[str, Any]) -> GraphFn:
    """A LiteRT interpreter for ``model_path`` (``.tflite`` + ``.io.json``); see
    :mod:`maskedge_runner.litert` (imported here, on first use, with ``ai_edge_litert``)."""
    from maskedge_runner.litert import make_litert as make

    return make(model_path, options)


BACKENDS: dict[str, BackendFactory] = {
    "onnxruntime": make_onnxruntime,
    "openvino": make_openvino,
    "litert": make_litert,
}
# the graph file a backend loads: graph_spec.json names the ONNX file, a backend may read another
# format of the same graph beside it (OpenVINO IR: backbone.xml + backbone.bin; LiteRT:
# backbone.tflite + backbone.io.json)
MODEL_SUFFIXES: dict[str, str] = {"onnxruntime": ".onnx", "openvino": ".xml", "litert": ".tflite"}
# the option that sets a backend's inference threads (the runner's and the bench's --threads)
THREAD_OPTION: dict[str, str] = {
    "onnxruntime": "intra_op_num_threads",
    "openvino": "inference_num_threads",
    "litert": "num_threads",
}
# the Python module that holds a backend's runtime, where it is not named like the backend
RUNTIME_MODULES: dict[str, str] = {"litert": "ai_edge_litert"}


def runtime_version(kind: str) -> str | None:
    """The installed version of backend ``kind``'s runtime (None when it is not importable)."""
    import importlib

    try:
        return str(importlib.import_module(RUNTIME_MODULES.get(kind, kind)).__version__)
    except (ImportError, AttributeError):
        return None


def model_file(kind: str, models: Path, spec_file: str) -> Path:
    """The file backend ``kind`` loads for the graph that graph_spec.json calls ``spec_file``."""
    return Path(models) / Path(spec_file).with_suffix(MODEL_SUFFIXES.get(kind, ".onnx")).name


def make_backend(
    kind: str,
    model_path: Path | str,
    options: Mapping[str, Any] | None = None,
) -> GraphFn:
    """The :data:`GraphFn` of backend ``kind`` for the graph file ``model_path``."""
    if kind not in BACKENDS:
        raise RunnerError(f"unknown backend {kind!r}; available: {', '.join(sorted(BACKENDS))}")
    path = Path(model_path)
    if not path.is_file():
        raise RunnerError(f"{path}: model file not found")
    return BACKENDS[kind](path, dict(options or {}))
