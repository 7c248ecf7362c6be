"""ONNX Runtime beside OpenVINO on the same host and val set, for the x86_64 build report.

:func:`compare_runtimes` is the x86_64 target's ``compare`` hook (see :mod:`pipeline.build`). It
runs, through the same runner (``maskedge_runner.engine.Engine``) and the same COCO evaluation:

- ONNX Runtime FP32 on the bundle's FP32 ONNX graphs (``models/fp32/*.onnx``);
- ONNX Runtime INT8 on the QDQ graphs the quantize stage made with
  :func:`targets.ort_quantize.quantize_graphs` on the same calibration inputs
  (``<quantize cache>/reference/onnxruntime/``);

and benchmarks both with ``python -m maskedge_runner.bench`` in their own processes (warm-up
excluded, the profile's thread count, ORT pool threads not spinning), the way
:func:`pipeline.latency.profile_latency` measured OpenVINO. The OpenVINO figures are the build's
own parity and latency results, handed in. Nothing here is estimated: every figure in the
returned table was measured in this call or in the build's stages that ran just before it.

Reads: the staging bundle and the ONNX Runtime reference folder. Writes: nothing.

Known limits: the ONNX Runtime and OpenVINO benchmarks run one after the other, not interleaved,
so a change in the host's load between them weighs on one side only; each side's figures carry
their spread between processes. ONNX Runtime keeps the mask head's ConvTranspose in float.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LATENCY_ROUNDS = 2


def ort_options(threads: int) -> dict[str, Any]:
    """ONNX Runtime options matching an OpenVINO profile's thread count."""
    return {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
            "graph_optimization_level": "all", "execution_mode": "sequential",
            "providers": ["CPUExecutionProvider"], "allow_spinning": False}


def _bench(folder: Path, precision: str, options: dict[str, Any], threads: int, runs: int,
           warmup: int, image: Path | None) -> dict[str, Any]:
    from pipeline.latency import _merge_rounds, run_bench_process

    rounds = [run_bench_process(folder, precision=precision, runs=runs, warmup=warmup,
                                runtime_options=options, threads=threads, backend="onnxruntime",
                                image=image)
              for _ in range(LATENCY_ROUNDS)]
    return _merge_rounds(rounds)


def _row(runtime: str, precision: str, ap: dict[str, Any], lat: dict[str, Any]) -> dict[str, Any]:
    e2e = lat["end_to_end_ms"]
    return {"runtime": runtime, "precision": precision, "box_ap": ap["box_ap"],
            "mask_ap": ap["mask_ap"], "mask_ap50": ap["mask_ap50"], "p50_ms": e2e["p50"],
            "p90_ms": e2e["p90"], "p99_ms": e2e["p99"],
            "graph_mean_ms": {g: lat["stages_ms"][g]["mean"]
                              for g in ("backbone", "box_head", "mask_head")}}


def compare_runtimes(*, staging: Path, quant_dir: Path, profile: Any, val: Any, limit: int | None,
                     runs: int, warmup: int, image: Path | None, parity: dict[str, Any],
                     latency: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime FP32/INT8 measured beside the build's OpenVINO FP32/INT8 (module doc)."""
    from maskedge_runner.engine import Engine
    from pipeline.errors import ConversionError
    from pipeline.evaluate import evaluate_coco

    started = time.perf_counter()
    reference = Path(quant_dir) / "reference" / "onnxruntime"
    if not (reference / "models" / "int8").is_dir():
        raise ConversionError(
            f"{reference}: no ONNX Runtime INT8 reference graphs; rebuild the quantize stage "
            "(invoke clean --all, or delete that quantize-x86_64 cache entry)")
    threads = profile.threads
    options = ort_options(threads)
    folders = {"fp32": Path(staging), "int8": reference}
    ort_ap, ort_lat = {}, {}
    for precision, folder in folders.items():
        engine = Engine.from_dir(folder, precision=precision, backend="onnxruntime",
                                 runtime_options=options)
        ort_ap[precision] = evaluate_coco(engine.predict, val, limit=limit)
        ort_lat[precision] = _bench(folder, precision, options, threads, runs, warmup, image)
        log.info("onnxruntime %s: mask AP %.4f, p50 %.1f ms", precision,
                 ort_ap[precision]["mask_ap"], ort_lat[precision]["end_to_end_ms"]["p50"])
    ov_ap = {"fp32": parity["ap"]["student_fp32"], "int8": parity["ap"]["student_int8"]}
    rows = [_row("openvino", p, ov_ap[p], latency[p]) for p in ("fp32", "int8")]
    rows += [_row("onnxruntime", p, ort_ap[p], ort_lat[p]) for p in ("fp32", "int8")]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    ratios = {
        "openvino_over_onnxruntime_p50": {
            p: ratio(latency[p]["end_to_end_ms"]["p50"], ort_lat[p]["end_to_end_ms"]["p50"])
            for p in ("fp32", "int8")},
        "int8_mask_ap_minus_onnxruntime_points": round(
            100 * (ov_ap["int8"]["mask_ap"] - ort_ap["int8"]["mask_ap"]), 3),
    }
    md = ["## ONNX Runtime vs OpenVINO (same host, same val set, same runner)", "",
          f"{int(ov_ap['int8']['images'])} val images; latency: {threads} threads, "
          f"{runs} timed runs after {warmup} warm-up per process, {LATENCY_ROUNDS} processes per "
          "row; ONNX Runtime INT8 is QDQ from the same calibration inputs.", "",
          "| runtime | precision | box AP | mask AP | mask AP50 | p50 ms | p90 ms | p99 ms | "
          "backbone ms | box head ms | mask head ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["graph_mean_ms"]
        md.append(f"| {r['runtime']} | {r['precision']} | {r['box_ap']:.4f} | {r['mask_ap']:.4f}"
                  f" | {r['mask_ap50']:.4f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {g['backbone']:.1f} | {g['box_head']:.1f} | "
                  f"{g['mask_head']:.1f} |")
    o = ratios["openvino_over_onnxruntime_p50"]
    md += ["", f"OpenVINO/ONNX Runtime end-to-end p50: FP32 {o['fp32']}, INT8 {o['int8']} "
               "(< 1: OpenVINO faster). OpenVINO INT8 mask AP minus ONNX Runtime INT8: "
               f"{ratios['int8_mask_ap_minus_onnxruntime_points']:+.2f} points.", ""]
    return {
        "what": "ONNX Runtime beside OpenVINO on this host and val set, through the runner",
        "rows": rows,
        "ratios": ratios,
        "onnxruntime": {"options": options, "reference": str(reference),
                        "latency": {p: {k: v for k, v in ort_lat[p].items() if k != "samples_ms"}
                                    for p in ort_lat}},
        "headline": (f"INT8 mask AP OpenVINO {ov_ap['int8']['mask_ap']:.3f} / ONNX Runtime "
                     f"{ort_ap['int8']['mask_ap']:.3f}; p50 OV/ORT {o['int8']}"),
        "markdown": md,
        "seconds": round(time.perf_counter() - started, 1),
    }
