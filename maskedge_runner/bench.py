"""Latency of a bundle on this machine, with numpy, Pillow and the runtime only.

    python -m maskedge_runner.bench BUNDLE_DIR --precision int8 --runs 50 --warmup 5 \\
        --threads 4 --image photo.jpg

prints one JSON object on stdout:

- ``cold_start_ms``: creating the runtime sessions, and the first inference, separately;
- ``warmup_runs``: how many runs after the first were made and excluded from the figures;
- ``end_to_end_ms``: p50/p90/p99/mean/min/max over ``runs`` timed calls of ``Engine.predict``
  (decoded image in, detections in original coordinates out: letterbox, three graphs, host code,
  mask pasting);
- ``stages_ms``: the same statistics per stage of ``Engine.last_timings`` (preprocess, each
  graph, proposal decoding, RoIAlign, box post-processing, mask pasting);
- ``host_postprocess``: the host-code stages together and their share of end to end;
- ``samples_ms``: every timed run's end-to-end and per-stage times, in order;
- the thread settings, runtime options and runtime version that ran, the host, the peak resident
  memory, and whether torch was loaded in the process (it must not be: B31).

Reads: the bundle (``graph_spec.json``, the backend's ``models/<precision>/`` files,
``manifest.json`` if present) and one image (``--image``, default the first file in
``BUNDLE_DIR/samples/``).
Writes: nothing (``--output FILE`` also writes the JSON there).

Known limits: one image, run repeatedly, so the number of RoIs and detections - and with them
the head and host-code times - are those of that image; decoding the image file is not timed.
Figures are for the machine this runs on, with the thread count given; on a shared or
thermally throttled machine they vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from maskedge_runner.backends import THREAD_OPTION, RunnerError, runtime_version
from maskedge_runner.engine import GRAPH_STAGES, STAGES, Engine, read_manifest
from maskedge_runner.preprocess import IMAGE_SUFFIXES, ImageReadError, load_image

HOST_POSTPROCESS = ("rpn_post", "roi_align_box", "box_post", "roi_align_mask", "mask_paste")
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def summarize(values_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation), mean, std, min and max of ``values_ms``."""
    a = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def figures(samples_ms: dict[str, list[float]]) -> dict[str, Any]:
    """The summary figures of raw timings (``{"end_to_end": [...], <stage>: [...]}``, ms)."""
    e2e = summarize(samples_ms["end_to_end"])
    stages = {s: summarize(samples_ms[s]) for s in STAGES}
    host_mean = sum(stages[s]["mean"] for s in HOST_POSTPROCESS)
    graphs_mean = sum(stages[s]["mean"] for s in GRAPH_STAGES)
    return {
        "end_to_end_ms": e2e,
        "stages_ms": stages,
        "graphs_ms_mean": {s: stages[s]["mean"] for s in GRAPH_STAGES},
        "host_postprocess": {
            "stages": list(HOST_POSTPROCESS),
            "mean_ms": host_mean,
            "share_of_end_to_end": host_mean / e2e["mean"] if e2e["mean"] else 0.0,
        },
        "graphs_share_of_end_to_end": graphs_mean / e2e["mean"] if e2e["mean"] else 0.0,
    }


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory, MB.

    On Linux it is ``VmHWM`` from ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` survives
    ``execve``, so a bench started from a large process (the build, with torch loaded) would
    report the parent's peak instead of its own.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _runtime_version(backend: str) -> str | None:
    return runtime_version(backend)


# CPU features that decide INT8 speed, as /proc/cpuinfo names them (x86 "flags", Arm "Features")
CPU_FEATURES = (
    "sse4_2", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
    "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "fphp",
)


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The :data:`CPU_FEATURES` this machine's CPU reports (empty where there is no cpuinfo)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            have = set(value.split())
            return [f for f in CPU_FEATURES if f in have]
    return []


def _runtime_capabilities(backend: str) -> list[str] | None:
    """What the runtime says the CPU can do for it (OpenVINO's OPTIMIZATION_CAPABILITIES)."""
    if backend != "openvino":
        return None
    try:
        import openvino as ov

        return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # noqa: BLE001 - an optional record, never a reason to fail the bench
        return None


def default_image(bundle: Path) -> Path:
    """The first image in ``bundle/samples/``, for a bench run without ``--image``."""
    samples = bundle / "samples"
    found = sorted(p for p in samples.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise RunnerError(f"no --image given and {samples} has no images; pass --image PATH")
    return found[0]


def run_bench(
    bundle: Path,
    *,
    precision: str = "int8",
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    image: Path | None = None,
    backend: str | None = None,
    runtime_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time ``Engine.predict`` on one image; return the figures described in the module doc."""
    if runs < 1:
        raise RunnerError(f"--runs={runs}: need at least one timed run")
    if warmup < 0:
        raise RunnerError(f"--warmup={warmup}: must be >= 0")
    bundle = Path(bundle)
    runtime = read_manifest(bundle).get("runtime", {})
    backend = backend or runtime.get("name") or "onnxruntime"
    options = dict(runtime.get("options", {})) if runtime.get("name", backend) == backend else {}
    options.update(runtime_options or {})
    if threads is not None:
        if threads < 1:
            raise RunnerError(f"--threads={threads}: must be >= 1")
        if backend not in THREAD_OPTION:
            raise RunnerError(
                f"--threads is not mapped for backend {backend!r}; set its thread "
                "option with --runtime-options"
            )
        options[THREAD_OPTION[backend]] = threads
    image_path = Path(image) if image else default_image(bundle)
    try:
        picture = load_image(image_path)
    except ImageReadError as err:
        raise RunnerError(str(err)) from err

    started = time.perf_counter()
    engine = Engine.from_dir(bundle, precision=precision, backend=backend, runtime_options=options)
    session_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    first = engine.predict(picture)
    first_ms = (time.perf_counter() - started) * 1e3
    for _ in range(warmup):
        engine.predict(picture)

    e2e: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    detections = []
    for _ in range(runs):
        started = time.perf_counter()
        result = engine.predict(picture)
        e2e.append((time.perf_counter() - started) * 1e3)
        for stage in STAGES:
            stages[stage].append(engine.last_timings.get(stage, 0.0) * 1e3)
        detections.append(len(result))

    return {
        "bundle": str(bundle),
        "precision": precision,
        "backend": backend,
        "runtime": {"name": backend, "version": _runtime_version(backend),
                    "capabilities": _runtime_capabilities(backend)},
        "runtime_options": options,
        "threads": {
            "option": THREAD_OPTION.get(backend),
            "value": options.get(THREAD_OPTION.get(backend, ""), None),
            "env": {k: os.environ.get(k) for k in THREAD_ENV},
        },
        "host": {
            "machine": platform.machine(),
            "system": platform.system(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "isa": cpu_features(),
            "python": platform.python_version(),
        },
        "image": {
            "path": str(image_path),
            "height": int(picture.shape[0]),
            "width": int(picture.shape[1]),
        },
        "cold_start_ms": {"session_create": session_ms, "first_inference": first_ms},
        "warmup_runs": warmup,
        "runs": runs,
        **figures({"end_to_end": e2e, **stages}),
        "samples_ms": {"end_to_end": e2e, **stages},
        "detections": {"first": len(first), "min": min(detections), "max": max(detections)},
        "peak_rss_mb": _peak_rss_mb(),
        "torch_loaded": "torch" in sys.modules,
        "note": "measured on this machine with the thread settings above; warm-up runs "
        "excluded; cold start reported separately",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maskedge_runner.bench",
        description="Latency of a maskedge bundle on this machine (prints JSON).",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder (graph_spec.json, models/)")
    parser.add_argument("--precision", default="int8", help="models/<precision> to run")
    parser.add_argument("--runs", type=int, default=50, help="timed runs (default 50)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="runs after the first, excluded from the figures (default 5)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: the bundle manifest's runtime options)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="image to run (default: the first in BUNDLE/samples/)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="runtime backend (default: the manifest's, else onnxruntime)",
    )
    parser.add_argument(
        "--runtime-options",
        default=None,
        help="JSON object of runtime options, over the manifest's",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.runtime_options) if args.runtime_options else None
        if options is not None and not isinstance(options, dict):
            raise RunnerError("--runtime-options must be a JSON object")
        result = run_bench(
            args.bundle,
            precision=args.precision,
            runs=args.runs,
            warmup=args.warmup,
            threads=args.threads,
            image=args.image,
            backend=args.backend,
            runtime_options=options,
        )
    except (RunnerError, json.JSONDecodeError) as err:
        print(f"maskedge_runner.bench: {err}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
