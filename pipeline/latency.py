"""Latency of a bundle's graphs, measured in separate processes with the profile's threads.

:func:`profile_latency` runs ``python -m maskedge_runner.bench`` in fresh subprocesses - never
in the build's own process, where torch is loaded with its own thread pools (B31) - with the
profile's runtime options (threads, graph optimisation level, execution mode, providers) and
``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` set to the profile's thread
count. Each precision runs in ``rounds`` processes, interleaved with the other precision
(fp32, int8, int8, fp32, ...) so that a change in the host's load weighs on both alike. Warm-up
runs are excluded and counted, cold start is reported separately, and each process's p50 is kept
so their spread shows how stable the host was (B30). The result holds both precisions' figures
plus INT8/FP32 ratios end to end and per graph.

When the bundle folder holds its own ``maskedge_runner/`` copy, that copy is what runs (as on the
device); otherwise the repository's.

Reads: the bundle folder (``graph_spec.json``, ``models/<precision>/*.onnx``, ``manifest.json``)
and one image. Writes: nothing.

Known limits: these are measurements on the build host with the profile's thread count, not on
the profile's device - the result says so, and says whether the host is the target's kind of
machine (``gated``). A host with fewer cores than the profile's threads oversubscribes them; the
result records both.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maskedge_runner.preprocess import IMAGE_SUFFIXES
from pipeline.errors import ConfigError, PipelineError
from targets.profiles import HardwareProfile

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RATIO_STAGES = ("backbone", "box_head", "mask_head")


def _bench_env(folder: Path, threads: int) -> tuple[dict[str, str], Path]:
    """Environment and working folder for the bench subprocess."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    own_runner = (folder / "maskedge_runner" / "bench.py").is_file()
    root = folder if own_runner else REPO
    env["PYTHONPATH"] = str(root)
    env.pop("PYTHONSTARTUP", None)
    return env, root


def run_bench_process(
    folder: Path,
    *,
    precision: str,
    runs: int,
    warmup: int,
    runtime_options: dict[str, Any],
    threads: int,
    backend: str,
    image: Path | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """One ``python -m maskedge_runner.bench`` run in its own process; its JSON as a dict."""
    folder = Path(folder).resolve()
    env, root = _bench_env(folder, threads)
    cmd = [
        sys.executable,
        "-m",
        "maskedge_runner.bench",
        str(folder),
        "--precision",
        precision,
        "--runs",
        str(runs),
        "--warmup",
        str(warmup),
        "--backend",
        backend,
        "--runtime-options",
        json.dumps(runtime_options),
    ]
    if image is not None:
        cmd += ["--image", str(Path(image).resolve())]
    try:
        done = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as err:
        raise PipelineError(
            f"latency benchmark of {folder} ({precision}) did not finish in {timeout_s:.0f} s; "
            "lower --latency-runs"
        ) from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PipelineError(
            f"latency benchmark of {folder} ({precision}) failed (exit {done.returncode}): "
            + " | ".join(tail)
        )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as err:
        raise PipelineError(
            f"latency benchmark of {folder} printed no JSON: {done.stdout[-300:]!r}"
        ) from err


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One precision's bench results from several processes as one result over all timed runs."""
    from maskedge_runner.bench import figures

    merged = dict(rounds[0])
    samples = {k: [v for r in rounds for v in r["samples_ms"][k]] for k in rounds[0]["samples_ms"]}
    merged.update(figures(samples))
    merged["samples_ms"] = samples
    merged["runs"] = sum(r["runs"] for r in rounds)
    merged["warmup_runs"] = sum(r["warmup_runs"] for r in rounds)
    merged["peak_rss_mb"] = max((r["peak_rss_mb"] or 0.0) for r in rounds) or None
    merged["detections"] = {
        "first": rounds[0]["detections"]["first"],
        "min": min(r["detections"]["min"] for r in rounds),
        "max": max(r["detections"]["max"] for r in rounds),
    }
    merged["rounds"] = [
        {
            "runs": r["runs"],
            "warmup_runs": r["warmup_runs"],
            "cold_start_ms": r["cold_start_ms"],
            "end_to_end_p50_ms": r["end_to_end_ms"]["p50"],
            "end_to_end_p90_ms": r["end_to_end_ms"]["p90"],
        }
        for r in rounds
    ]
    p50s = [r["end_to_end_ms"]["p50"] for r in rounds]
    merged["p50_spread_between_rounds"] = (max(p50s) - min(p50s)) / min(p50s) if min(p50s) else 0.0
    return merged


def profile_latency(
    folder: Path,
    profile: HardwareProfile,
    *,
    precisions: Sequence[str] = ("fp32", "int8"),
    runs: int = 30,
    warmup: int = 5,
    rounds: int = 2,
    image: Path | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Benchmark each precision of the bundle in ``folder`` in its own processes.

    Each precision runs in ``rounds`` fresh processes of ``runs`` timed runs after ``warmup``
    excluded ones, in interleaved order (fp32, int8, int8, fp32, ...) so that a change in the
    machine's load during the measurement weighs on both alike; the figures are over all timed
    runs of a precision, and ``rounds`` lists each process's cold start and p50 (their spread
    says how stable the host was, B30). Returns ``{precision: bench figures, ...}`` plus
    ``int8_over_fp32`` (ratios of end-to-end p50/p90 and of mean time per graph; < 1 means INT8
    is faster), the profile's thread settings, ``gated`` (whether the host is the target's kind
    of machine, so that the latency budget can fairly gate the build), ``gating_note`` and
    ``note`` (plain words on what was measured). ``image`` defaults to the bench's default (the
    first image in ``folder/samples/``).
    """
    from targets import get_target

    if runs < 1 or warmup < 0 or rounds < 1:
        raise ConfigError(
            f"latency runs={runs}, warmup={warmup}, rounds={rounds}: need runs >= 1, "
            "warmup >= 0, rounds >= 1"
        )
    folder = Path(folder)
    if image is None and not any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in (folder / "samples").glob("*")
    ):
        raise ConfigError(
            f"no image for the latency benchmark of {folder}: pass image= (e.g. a validation "
            f"image) or put one in {folder / 'samples'}"
        )
    target = get_target(profile.target)
    options = profile.runtime.to_backend_options()
    threads = profile.threads
    machine = platform.machine()
    started = time.perf_counter()

    per_round: dict[str, list[dict[str, Any]]] = {p: [] for p in precisions}
    for index in range(rounds):
        order = list(precisions) if index % 2 == 0 else list(reversed(precisions))
        for precision in order:
            per_round[precision].append(
                run_bench_process(
                    folder,
                    precision=precision,
                    runs=runs,
                    warmup=warmup,
                    runtime_options=options,
                    threads=threads,
                    backend=target.backend,
                    image=image,
                    timeout_s=timeout_s,
                )
            )
    result: dict[str, Any] = {}
    for precision in precisions:
        result[precision] = _merge_rounds(per_round[precision])
        e2e = result[precision]["end_to_end_ms"]
        log.info(
            "latency %s: p50 %.1f ms, p90 %.1f ms (%d processes x %d runs after %d warm-up, "
            "%d threads)",
            precision,
            e2e["p50"],
            e2e["p90"],
            rounds,
            runs,
            warmup,
            threads,
        )
    if "fp32" in result and "int8" in result:
        fp32, int8 = result["fp32"], result["int8"]
        result["int8_over_fp32"] = {
            "end_to_end_p50": _ratio(int8["end_to_end_ms"]["p50"], fp32["end_to_end_ms"]["p50"]),
            "end_to_end_p90": _ratio(int8["end_to_end_ms"]["p90"], fp32["end_to_end_ms"]["p90"]),
            **{
                f"{g}_mean": _ratio(int8["stages_ms"][g]["mean"], fp32["stages_ms"][g]["mean"])
                for g in RATIO_STAGES
            },
        }

    native = target.runs_natively_on(machine)
    cores = os.cpu_count() or 1
    result["profile"] = profile.name
    result["threads"] = threads
    result["runtime_options"] = options
    result["rounds"] = rounds
    result["host"] = {"machine": machine, "cpu_count": cores}
    result["oversubscribed"] = threads > cores
    result["gated"] = native
    result["gating_note"] = (
        f"measured on a {machine} host like the {target.name} target's devices"
        if native
        else f"measured on a {machine} host, not a {target.name} device: reported, not gated"
    )
    result["note"] = (
        f"Host measurements on this {machine} machine ({cores} CPU cores) with the {profile.name} "
        f"profile's thread count ({threads}) and runtime options, each precision in its own "
        f"processes ({rounds} per precision, interleaved); {warmup} warm-up runs excluded per "
        f"process, {runs} timed runs per process; cold start reported separately. They are not "
        f"{profile.description} figures; run `python -m maskedge_runner.bench` on the device "
        "for those."
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
