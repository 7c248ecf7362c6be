"""Benchmark of an x86_64 (OpenVINO) bundle: prints figures, asserts nothing.

    python benchmarks/bench_openvino.py [BUNDLE] [--runs N] [--warmup N] [--rounds N]
                                        [--threads N]

BUNDLE defaults to ``artifacts/x86_64`` (written by ``invoke build --target=x86_64``). In one
run, on this host, each in its own ``python -m maskedge_runner.bench`` processes (``rounds`` of
them per row, interleaved), it measures:

- OpenVINO FP32 IR and NNCF INT8 IR of the bundle (the profile's OpenVINO options);
- ONNX Runtime FP32 on the bundle's FP32 ONNX graphs, and ONNX Runtime QDQ INT8 on the
  reference graphs the quantize stage made from the same calibration inputs (the folder the
  manifest's ``comparison.onnxruntime.reference`` names), with the same thread count;

and prints the INT8/FP32 latency ratio per graph and end to end for OpenVINO (and ONNX Runtime),
then OpenVINO/ONNX Runtime per graph and end to end. Every figure is measured in this run;
compare ratios, not absolute times, on a shared machine. The host's CPU features are printed
with them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.latency import _merge_rounds, run_bench_process  # noqa: E402
from targets.x86_64.compare import ort_options  # noqa: E402

GRAPHS = ("backbone", "box_head", "mask_head")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=REPO / "artifacts" / "x86_64")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per process")
    parser.add_argument("--warmup", type=int, default=5, help="excluded warm-up runs per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per row (interleaved)")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads (default: the bundle profile's)")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    ov_opts = dict(manifest["runtime"]["options"])
    threads = args.threads or ov_opts["inference_num_threads"]
    ov_opts["inference_num_threads"] = threads
    comparison = manifest.get("comparison") or {}
    reference = Path(comparison.get("onnxruntime", {}).get("reference", ""))
    if not (reference / "models" / "int8").is_dir():
        sys.exit(f"{bundle}: the manifest names no ONNX Runtime reference folder that exists "
                 f"({reference}); rebuild with invoke build --target=x86_64")
    ort_opts = ort_options(threads)
    rows = {  # name -> (folder, precision, backend, options)
        "openvino fp32": (bundle, "fp32", "openvino", ov_opts),
        "openvino int8": (bundle, "int8", "openvino", ov_opts),
        "onnxruntime fp32": (bundle, "fp32", "onnxruntime", ort_opts),
        "onnxruntime int8": (reference, "int8", "onnxruntime", ort_opts),
    }
    image = next((bundle / "samples").iterdir())
    runs: dict[str, list] = {name: [] for name in rows}
    for index in range(args.rounds):
        order = list(rows) if index % 2 == 0 else list(reversed(rows))
        for name in order:
            folder, precision, backend, options = rows[name]
            runs[name].append(run_bench_process(
                folder, precision=precision, runs=args.runs, warmup=args.warmup,
                runtime_options=options, threads=threads, backend=backend, image=image))
    result = {name: _merge_rounds(r) for name, r in runs.items()}

    def mean(name: str, graph: str) -> float:
        return result[name]["stages_ms"][graph]["mean"]

    def p(name: str, q: str) -> float:
        return result[name]["end_to_end_ms"][q]

    host = result["openvino int8"]["host"]
    print(f"\nmaskedge x86_64 bundle benchmark: {bundle}\nhost {host['machine']}, "
          f"{host['cpu_count']} CPUs, features: {', '.join(host.get('isa') or []) or '-'}; "
          f"OpenVINO capabilities: "
          f"{', '.join(result['openvino int8']['runtime'].get('capabilities') or []) or '-'}\n"
          f"{threads} threads, {args.rounds} processes x {args.runs} runs per row after "
          f"{args.warmup} warm-up each\n")
    header = f"{'stage':<16}" + "".join(f"{n:>18}" for n in rows)
    print(header + "\n" + "-" * len(header))
    for graph in GRAPHS:
        print(f"{graph + ' ms':<16}" + "".join(f"{mean(n, graph):>18.2f}" for n in rows))
    for q in ("p50", "p90", "p99"):
        print(f"{'end to end ' + q:<16}" + "".join(f"{p(n, q):>18.2f}" for n in rows))

    print(f"\n{'INT8/FP32':<16}{'openvino':>12}{'onnxruntime':>14}")
    for graph in GRAPHS:
        print(f"{graph:<16}{_ratio(mean('openvino int8', graph), mean('openvino fp32', graph)):>12}"
              f"{_ratio(mean('onnxruntime int8', graph), mean('onnxruntime fp32', graph)):>14}")
    for q in ("p50", "p90"):
        print(f"{'end to end ' + q:<16}{_ratio(p('openvino int8', q), p('openvino fp32', q)):>12}"
              f"{_ratio(p('onnxruntime int8', q), p('onnxruntime fp32', q)):>14}")

    print(f"\n{'OpenVINO/ORT':<16}{'fp32':>10}{'int8':>10}")
    for graph in GRAPHS:
        cells = [_ratio(mean("openvino " + x, graph), mean("onnxruntime " + x, graph))
                 for x in ("fp32", "int8")]
        print(f"{graph:<16}" + "".join(f"{c:>10}" for c in cells))
    for q in ("p50", "p90"):
        print(f"{'end to end ' + q:<16}"
              + "".join(f"{_ratio(p('openvino ' + x, q), p('onnxruntime ' + x, q)):>10}"
                        for x in ("fp32", "int8")))
    print("\n(< 1: the first is faster)")


if __name__ == "__main__":
    main()
