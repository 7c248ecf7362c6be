"""Benchmark of a mobile (LiteRT) bundle: prints figures, asserts nothing.

    python benchmarks/bench_mobile.py [BUNDLE] [--runs N] [--warmup N] [--rounds N]
                                      [--threads N]

BUNDLE defaults to ``artifacts/mobile`` (written by ``invoke build --target=mobile``). On this
host, each in its own ``python -m maskedge_runner.bench`` process (``rounds`` of them per row,
interleaved so that a load change on a shared machine hits both rows alike), it measures the
bundle's FP32 ``.tflite`` graphs and its full-integer INT8 ones on LiteRT with the XNNPACK
delegate and the profile's thread count (``--threads`` overrides it), and prints per graph and
end to end the mean / p50 / p90 times and the INT8/FP32 latency ratio, beside the XNNPACK
partition count of each INT8 graph from the bundle's ops report.

This host is not a phone: an x86 CPU runs XNNPACK's int8 kernels with other instructions than an
Armv8.2+ phone core (SDOT/SMMLA), so the ratio here says nothing certain about a phone's. Every
figure is measured in this run; compare ratios, not absolute times, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.latency import _merge_rounds, run_bench_process  # noqa: E402

GRAPHS = ("backbone", "box_head", "mask_head")
ROWS = ("fp32", "int8")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=REPO / "artifacts" / "mobile")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per process")
    parser.add_argument("--warmup", type=int, default=5, help="excluded warm-up runs per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per row (interleaved)")
    parser.add_argument(
        "--threads", type=int, default=None, help="LiteRT threads (default: the profile's)"
    )
    args = parser.parse_args()

    bundle = args.bundle.resolve()
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"{bundle}: no manifest.json; build it with invoke build --target=mobile")
    manifest = json.loads(manifest_path.read_text())
    if manifest["runtime"]["name"] != "litert":
        sys.exit(f"{bundle}: a {manifest['runtime']['name']} bundle, not a mobile (litert) one")
    options = {**manifest["runtime"]["options"], "use_xnnpack": True}
    threads = args.threads or int(options["num_threads"])
    options["num_threads"] = threads
    ops_path = bundle / "models" / "int8" / "ops_report.json"
    ops = json.loads(ops_path.read_text()) if ops_path.is_file() else {}
    image = next((bundle / "samples").iterdir())

    runs: dict[str, list] = {p: [] for p in ROWS}
    for index in range(args.rounds):
        for precision in ROWS if index % 2 == 0 else ROWS[::-1]:
            runs[precision].append(
                run_bench_process(
                    bundle,
                    precision=precision,
                    runs=args.runs,
                    warmup=args.warmup,
                    runtime_options=options,
                    threads=threads,
                    backend="litert",
                    image=image,
                )
            )
    result = {p: _merge_rounds(r) for p, r in runs.items()}

    def stage(precision: str, graph: str, q: str) -> float:
        return result[precision]["stages_ms"][graph][q]

    def e2e(precision: str, q: str) -> float:
        return result[precision]["end_to_end_ms"][q]

    host = result["int8"]["host"]
    cpus = os.cpu_count() or 1
    print(
        f"\nmaskedge mobile bundle benchmark: {bundle}\n"
        f"profile {manifest['profile']['name']}; host {host['machine']}, {host['cpu_count']} "
        f"CPUs, features: {', '.join(host.get('isa') or []) or '-'}\n"
        f"LiteRT {result['int8']['runtime'].get('version')}, XNNPACK, {threads} threads"
        + (f" (more than this host's {cpus} CPUs)" if threads > cpus else "")
        + f"; {args.rounds} processes x {args.runs} runs per precision after {args.warmup} "
        "warm-up each\n"
    )
    partitions = ops.get("xnnpack_partitions_int8", {})
    header = (
        f"{'graph':<16}{'fp32 mean':>11}{'int8 mean':>11}{'fp32 p50':>10}{'int8 p50':>10}"
        f"{'fp32 p90':>10}{'int8 p90':>10}{'INT8/FP32':>11}{'XNNPACK parts':>15}"
    )
    print(header + "\n" + "-" * len(header))
    for graph in GRAPHS:
        cells = [stage(p, graph, "mean") for p in ROWS]
        cells += [stage(p, graph, q) for q in ("p50", "p90") for p in ROWS]
        print(
            f"{graph:<16}{cells[0]:>11.2f}{cells[1]:>11.2f}"
            + "".join(f"{c:>10.2f}" for c in cells[2:])
            + f"{_ratio(cells[1], cells[0]):>11}{str(partitions.get(graph, '-')):>15}"
        )
    for q in ("p50", "p90", "p99"):
        fp32, int8 = e2e("fp32", q), e2e("int8", q)
        print(f"{'end to end ' + q:<16}{fp32:>11.2f}{int8:>11.2f}{'':>40}{_ratio(int8, fp32):>11}")
    spread = max(result[p]["p50_spread_between_rounds"] for p in ROWS)
    print(
        f"\n(INT8/FP32 < 1: INT8 is faster; p50 spread between rounds up to {100 * spread:.0f} %)"
    )


if __name__ == "__main__":
    main()
