"""Benchmark of the ARM64 build on the demo: prints figures, asserts nothing.

    python benchmarks/bench_build.py [--artifacts DIR] [--distill-steps N] [--runs N]

Runs ``invoke build --target=arm64`` twice in fresh processes against one artifacts folder
(default: a new temporary one, so the first build is cold), then prints from the resulting
manifest: INT8 vs FP32 latency ratio per graph and end to end, the host post-processing share,
the cold build time and the warm rebuild time. Every figure is measured in this run, on this
host, with the profile's thread count; compare ratios, not absolute times, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _build(artifacts: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-c",
           "import sys; from pathlib import Path; import tasks; "
           "from pipeline.build import BuildConfig, run_build; tasks._setup_logging(); "
           f"run_build(BuildConfig(target='arm64', artifacts=Path({str(artifacts)!r}), "
           f"distill_steps={args.distill_steps!r}, latency_runs={args.runs}))"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="artifacts folder (default: a new temporary one: a cold build)")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="distillation steps (default: the build's standard budget)")
    parser.add_argument("--runs", type=int, default=30, help="timed latency runs per precision")
    args = parser.parse_args()
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="maskedge-bench-"))

    cold = _build(artifacts, args)
    warm = _build(artifacts, args)
    manifest = json.loads((artifacts / "arm64" / "manifest.json").read_text())
    lat = manifest["latency"]
    ratios = lat["int8_over_fp32"]
    print(f"\nmaskedge arm64 build benchmark (host: {manifest['host']['machine']}, "
          f"profile {manifest['profile']['name']}, threads "
          f"{manifest['profile']['runtime']['intra_op_num_threads']})")
    print(f"{'stage':<16}{'FP32 ms':>10}{'INT8 ms':>10}{'INT8/FP32':>11}")
    for stage in ("backbone", "box_head", "mask_head"):
        f = lat["fp32"]["stages_ms"][stage]["mean"]
        i = lat["int8"]["stages_ms"][stage]["mean"]
        print(f"{stage:<16}{f:>10.2f}{i:>10.2f}{i / f:>11.2f}")
    for q in ("p50", "p90"):
        f = lat["fp32"]["end_to_end_ms"][q]
        i = lat["int8"]["end_to_end_ms"][q]
        print(f"{'end to end ' + q:<16}{f:>10.2f}{i:>10.2f}{i / f:>11.2f}")
    print(f"ratios as the manifest records them: {json.dumps(ratios)}")
    for p in ("fp32", "int8"):
        host = lat[p]["host_postprocess"]
        print(f"host post-processing ({p}): {host['mean_ms']:.2f} ms = "
              f"{host['share_of_end_to_end']:.1%} of end to end ({', '.join(host['stages'])})")
    print(f"cold build: {cold:.0f} s   warm rebuild: {warm:.0f} s   ({artifacts})")


if __name__ == "__main__":
    main()
