"""Latency profiling: the bench's JSON structure, its own process, threads from the profile.

No test asserts a time: only that the figures exist, are ordered and were taken the right way
(warm-up excluded and counted, cold start apart, no torch in the process - B30/B31).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_bundle import tiny_bundle

from maskedge_runner.bench import HOST_POSTPROCESS, summarize
from maskedge_runner.engine import STAGES
from pipeline.latency import profile_latency
from targets import get_target

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_student, tmp_path_factory, demo_data):
    return tiny_bundle(tiny_student, tmp_path_factory, demo_data)


@pytest.fixture(scope="module")
def latency(tiny):
    profile = get_target("arm64").profile("rpi4")
    return profile, profile_latency(tiny.folder, profile, runs=4, warmup=2)


def _check_bench(result: dict, runs: int, warmup: int) -> None:
    assert result["runs"] == runs and result["warmup_runs"] == warmup
    cold = result["cold_start_ms"]
    assert cold["session_create"] > 0 and cold["first_inference"] > 0
    e2e = result["end_to_end_ms"]
    assert e2e["min"] <= e2e["p50"] <= e2e["p90"] <= e2e["p99"] <= e2e["max"]
    assert e2e["min"] <= e2e["mean"] <= e2e["max"]
    assert set(result["stages_ms"]) == set(STAGES)
    for stats in result["stages_ms"].values():
        assert 0 <= stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    host = result["host_postprocess"]
    assert host["stages"] == list(HOST_POSTPROCESS)
    assert host["mean_ms"] == pytest.approx(
        sum(result["stages_ms"][s]["mean"] for s in HOST_POSTPROCESS)
    )
    assert 0 < host["share_of_end_to_end"] < 1
    # stages are parts of one call: together they cannot exceed the end-to-end mean by much
    parts = sum(s["mean"] for s in result["stages_ms"].values())
    assert parts <= e2e["mean"] * 1.01
    assert result["torch_loaded"] is False
    assert result["runtime"]["name"] == "onnxruntime" and result["runtime"]["version"]
    assert result["detections"]["min"] <= result["detections"]["max"]
    samples = result["samples_ms"]
    assert set(samples) == {"end_to_end", *STAGES}
    assert all(len(v) == runs for v in samples.values())
    assert result["end_to_end_ms"]["p50"] == pytest.approx(float(np.median(samples["end_to_end"])))
    assert result["peak_rss_mb"] > 0


def test_each_precision_is_benchmarked_in_its_own_process(tiny, latency) -> None:
    profile, result = latency
    assert result["rounds"] == 2
    for precision in ("fp32", "int8"):
        bench = result[precision]
        # two processes per precision, merged: 2 x 4 timed runs, 2 x 2 warm-up runs excluded
        _check_bench(bench, runs=8, warmup=4)
        assert bench["precision"] == precision
        assert len(bench["rounds"]) == 2
        for one in bench["rounds"]:
            assert one["runs"] == 4 and one["warmup_runs"] == 2
            assert one["cold_start_ms"]["session_create"] > 0
            assert one["cold_start_ms"]["first_inference"] > 0
        assert bench["p50_spread_between_rounds"] >= 0
        assert Path(bench["bundle"]) == tiny.folder.resolve()
        # threads come from the profile, in the session options and the environment
        assert bench["runtime_options"] == profile.runtime.to_backend_options()
        assert bench["threads"] == {
            "option": "intra_op_num_threads",
            "value": profile.threads,
            "env": {
                k: str(profile.threads)
                for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
            },
        }
        assert bench["image"]["path"].startswith(str(tiny.folder.resolve() / "samples"))


def test_result_holds_ratios_and_says_what_was_measured(latency) -> None:
    profile, result = latency
    ratios = result["int8_over_fp32"]
    assert set(ratios) == {
        "end_to_end_p50",
        "end_to_end_p90",
        "backbone_mean",
        "box_head_mean",
        "mask_head_mean",
    }
    assert ratios["end_to_end_p50"] == pytest.approx(
        result["int8"]["end_to_end_ms"]["p50"] / result["fp32"]["end_to_end_ms"]["p50"]
    )
    assert all(v > 0 for v in ratios.values())
    assert result["profile"] == "rpi4" and result["threads"] == profile.threads
    assert result["runtime_options"] == profile.runtime.to_backend_options()
    native = get_target("arm64").runs_natively_on(platform.machine())
    assert result["gated"] is native
    assert "Host measurements" in result["note"] and str(profile.threads) in result["note"]
    assert result["oversubscribed"] == (profile.threads > result["host"]["cpu_count"])
    json.dumps(result)  # manifest-ready


def _bench_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maskedge_runner.bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_cli_prints_json_with_the_threads_given(tiny, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = _bench_cli(
        str(tiny.folder),
        "--precision",
        "int8",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--output",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result
    _check_bench(result, runs=2, warmup=0)
    assert result["runtime_options"]["intra_op_num_threads"] == 1
    assert result["threads"]["value"] == 1


def test_a_bundle_without_an_image_is_refused_before_running(tiny, tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="no image for the latency benchmark"):
        profile_latency(tmp_path, get_target("arm64").profile(), runs=1, warmup=0)


def test_bench_cli_errors_are_one_line(tiny, tmp_path: Path) -> None:
    done = _bench_cli(str(tiny.folder), "--runs", "0")
    assert done.returncode == 1 and "--runs=0" in done.stderr
    empty = tmp_path / "bundle"
    empty.mkdir()
    done = _bench_cli(str(empty), "--image", str(next((tiny.folder / "samples").iterdir())))
    assert done.returncode == 1 and "graph_spec.json" in done.stderr
    done = _bench_cli(str(tiny.folder), "--image", str(tmp_path / "missing.png"))
    assert done.returncode == 1 and "missing.png" in done.stderr
    assert "Traceback" not in done.stderr


def test_summarize_percentiles() -> None:
    stats = summarize([float(v) for v in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert (stats["min"], stats["max"], stats["mean"]) == (1.0, 100.0, 50.5)
