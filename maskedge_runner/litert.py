"""The LiteRT (TensorFlow Lite) backend: one ``.tflite`` graph behind the engine's call signature.

A LiteRT graph converted from ONNX differs from it at the boundary in three ways, and each is
recorded at build time, verified with numbers (``targets/mobile/tflite_convert.py``), in a
sidecar ``<graph>.io.json`` beside ``<graph>.tflite``:

- **layout**: the converter turns NCHW into NHWC. Each input and output records ``perm``, the
  axis permutation from the ONNX layout to the LiteRT one (``tflite = onnx.transpose(perm)``);
  the backend transposes inputs with it and outputs back with its inverse, so the engine sees
  the ONNX layout it was written for;
- **names**: outputs are bound by signature key (the ONNX output name the converter kept), never
  by position - a full-integer model may list its output tensors in another order under generic
  names;
- **batch**: LiteRT graphs here have static shapes (no dynamic tensors). The heads take a fixed
  number of RoIs (``batch``); a call with another number is run in chunks of ``batch`` rows, the
  last one padded with zeros and the padding cut from the outputs (rows are independent in the
  heads, so padding changes nothing in the real rows).

Input and output types: float32 at the boundary by default (the model quantizes and dequantizes
inside); a model with int8/uint8 inputs or outputs is fed and read with the tensor's own scale
and zero point.

Options (all optional): ``num_threads`` (int >= 1; default 1) and ``use_xnnpack`` (bool, default
true: LiteRT's default XNNPACK CPU delegate; false runs LiteRT's reference builtin kernels).

Only ``ai_edge_litert`` is needed on the device (``pip install ai-edge-litert``). Known limit:
``ai-edge-litert`` ships wheels for Linux (x86_64, aarch64) and macOS; on a phone the same
``.tflite`` files and sidecars are run by the app's LiteRT runtime, which must apply the same
boundary rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maskedge_runner.backends import RunnerError

LITERT_OPTIONS = ("num_threads", "use_xnnpack")
IO_FORMAT = "maskedge-litert-io"


def io_file(model_path: Path) -> Path:
    """The sidecar that describes ``model_path``'s inputs and outputs."""
    return Path(model_path).with_suffix(".io.json")


def read_io(model_path: Path) -> dict[str, Any]:
    """The validated sidecar of ``model_path``."""
    path = io_file(model_path)
    if not path.is_file():
        raise RunnerError(
            f"{path}: not found; a .tflite graph of a maskedge bundle comes with its input/output "
            "description - rebuild the bundle with `invoke build --target=mobile`"
        )
    try:
        io = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunnerError(f"{path}: cannot read ({err}); the bundle is damaged") from err
    if io.get("format") != IO_FORMAT or not io.get("inputs") or not io.get("outputs"):
        raise RunnerError(f"{path}: not a {IO_FORMAT} file; rebuild the bundle")
    return io


def _options(options: Mapping[str, Any]) -> tuple[int, bool]:
    unknown = sorted(set(options) - set(LITERT_OPTIONS))
    if unknown:
        raise RunnerError(f"unknown litert options {unknown}; known: {', '.join(LITERT_OPTIONS)}")
    threads = options.get("num_threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise RunnerError(f"runtime option num_threads={threads!r}: expected an integer >= 1")
    xnnpack = options.get("use_xnnpack", True)
    if not isinstance(xnnpack, bool):
        raise RunnerError(f"runtime option use_xnnpack={xnnpack!r}: expected true/false")
    return int(threads), xnnpack


def load_interpreter(model_path: Path, num_threads: int = 1, use_xnnpack: bool = True) -> Any:
    """A LiteRT interpreter for ``model_path``, tensors allocated."""
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError as err:
        raise RunnerError(
            "the litert backend needs the ai-edge-litert package: pip install ai-edge-litert"
        ) from err
    resolver = (
        litert.OpResolverType.AUTO
        if use_xnnpack
        else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    try:
        interp = litert.Interpreter(
            model_path=str(model_path),
            num_threads=num_threads,
            experimental_op_resolver_type=resolver,
        )
        interp.allocate_tensors()
    except (RuntimeError, ValueError) as err:
        raise RunnerError(
            f"{model_path}: LiteRT cannot load this model ({err}); rebuild the bundle or use the "
            "ai-edge-litert version named in its manifest"
        ) from err
    return interp


def _to_model(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    """A float array in the model's input type (quantized with the tensor's scale/zero point)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return value.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(value / scale) + zero, info.min, info.max).astype(dtype)


def _from_model(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return value.astype(np.float32, copy=False)
    scale, zero = detail["quantization"]
    return ((value.astype(np.float32) - zero) * scale).astype(np.float32)


class LiteRtGraph:
    """One LiteRT interpreter behind the :data:`~maskedge_runner.backends.GraphFn` signature."""

    def __init__(self, interpreter: Any, io: Mapping[str, Any], path: Path) -> None:
        self.interpreter = interpreter
        self.path = path
        signature = io.get("signature", "serving_default")
        signatures = interpreter.get_signature_list()
        if signature not in signatures:
            raise RunnerError(
                f"{path}: no signature {signature!r} (has {sorted(signatures)}); rebuild the bundle"
            )
        self.runner = interpreter.get_signature_runner(signature)
        in_details = self.runner.get_input_details()
        out_details = self.runner.get_output_details()
        self.inputs = list(io["inputs"])
        self.outputs = list(io["outputs"])
        for kind, bound, details in (
            ("input", self.inputs, in_details),
            ("output", self.outputs, out_details),
        ):
            missing = [b["key"] for b in bound if b["key"] not in details]
            if missing:
                raise RunnerError(
                    f"{path}: {kind} signature keys {missing} not in the model (has "
                    f"{sorted(details)}); the sidecar {io_file(path).name} does not match it"
                )
        self.in_details = in_details
        self.out_details = out_details
        self.batch = int(io.get("batch", 1))
        self.input_names = [b["name"] for b in self.inputs]
        self.output_names = [b["name"] for b in self.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model_feeds = {
            b["key"]: _to_model(
                np.ascontiguousarray(np.transpose(feeds[b["name"]], b["perm"])),
                self.in_details[b["key"]],
            )
            for b in self.inputs
        }
        raw = self.runner(**model_feeds)
        result = {}
        for b in self.outputs:
            value = _from_model(np.asarray(raw[b["key"]]), self.out_details[b["key"]])
            result[b["name"]] = np.ascontiguousarray(np.transpose(value, np.argsort(b["perm"])))
        return result

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise RunnerError(
                f"{self.path.name}: inputs {missing} missing (given {sorted(inputs)})"
            )
        feeds = {n: np.asarray(inputs[n], dtype=np.float32) for n in self.input_names}
        rows = {v.shape[0] for v in feeds.values()}
        if len(rows) != 1:
            raise RunnerError(f"{self.path.name}: inputs disagree on their first axis: {rows}")
        n = rows.pop()
        if n == self.batch:
            return self._run(feeds)
        if self.batch == 1 and n != 1:
            raise RunnerError(f"{self.path.name}: takes one item per call, got {n}")
        chunks: list[dict[str, np.ndarray]] = []
        for start in range(0, n, self.batch):
            part = {}
            for name, value in feeds.items():
                piece = value[start : start + self.batch]
                if piece.shape[0] < self.batch:
                    pad = np.zeros((self.batch - piece.shape[0], *piece.shape[1:]), np.float32)
                    piece = np.concatenate([piece, pad])
                part[name] = piece
            out = self._run(part)
            chunks.append({k: v[: min(self.batch, n - start)] for k, v in out.items()})
        if not chunks:  # n == 0: run once on padding to learn the output shapes
            out = self._run(
                {k: np.zeros((self.batch, *v.shape[1:]), np.float32) for k, v in feeds.items()}
            )
            return {k: v[:0] for k, v in out.items()}
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def make_litert(model_path: Path, options: Mapping[str, Any]) -> LiteRtGraph:
    """A LiteRT graph for ``model_path`` (a ``.tflite`` with its ``.io.json``) and ``options``."""
    threads, xnnpack = _options(options)
    io = read_io(model_path)
    return LiteRtGraph(load_interpreter(model_path, threads, xnnpack), io, Path(model_path))
