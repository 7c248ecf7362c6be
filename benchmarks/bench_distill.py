"""Benchmark of distillation on the demo: prints the gap table, asserts nothing.

    python benchmarks/bench_distill.py [--steps N] [--student mobilenet_v3_large]
        [--runs baseline,distilled,unlabelled] [--set name=value ...] [--val-limit N]
        [--out artifacts/bench-distill]

Trains, on the demo train split, the students named by ``--runs`` with the same step budget:

- ``baseline``: ground truth alone, no teacher (:func:`pipeline.distill.baseline_settings`);
- ``distilled``: the build's distillation settings (``DistillSettings`` defaults, changed by
  ``--set``) on ground truth plus the teacher;
- ``unlabelled``: the same settings on the demo's train images without their annotations
  (teacher pseudo-labels and soft targets only).

Then evaluates the teacher and each student in PyTorch on the demo val split (COCO box and mask
AP, pycocotools) and prints one table: AP, parameters, MACs at the deployment size, training
seconds, and the fraction of the teacher-baseline mask-AP gap each student closed. Every figure is
measured in this run. Each student trains in ``<out>/<run>-<settings hash>/`` and resumes from
there when interrupted (a finished run is reused, so a second call only evaluates).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="step budget (default: build's)")
    parser.add_argument("--student", default="mobilenet_v3_large")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--runs", default="baseline,distilled")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a DistillSettings field of the distilled runs")
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench-distill")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()

    import tasks

    tasks._setup_logging()
    log = logging.getLogger("bench_distill")

    import torch

    from pipeline.cache import hash_json
    from pipeline.checkpoint import load_checkpoint
    from pipeline.datasets import CocoInstances, list_images
    from pipeline.demo import DemoSpec, ensure_demo_data
    from pipeline.distill import DistillSettings, baseline_settings, distill, gap_closed
    from pipeline.evaluate import TorchPredictor, evaluate_coco
    from pipeline.models import count_macs, count_parameters, student_spec
    from pipeline.train import DEMO_TEACHER

    names = {f.name for f in fields(DistillSettings)}
    overrides = {}
    for item in args.set:
        key, _, text = item.partition("=")
        if key not in names:
            parser.error(f"--set {item!r}: no DistillSettings field {key!r}")
        overrides[key] = _value(text)
    if args.steps:
        overrides["steps"] = args.steps
    settings = replace(DistillSettings(), **overrides)

    splits = ensure_demo_data(REPO / "artifacts" / "demo_data", DemoSpec())
    train = CocoInstances(splits["train"] / "annotations.json", splits["train"] / "images")
    val = CocoInstances(splits["val"] / "annotations.json", splits["val"] / "images")
    loaded = load_checkpoint(DEMO_TEACHER)
    teacher = loaded.model
    spec = student_spec(loaded.num_classes, backbone=args.student, image_size=args.image_size)

    plans = {"baseline": (baseline_settings(settings), train),
             "distilled": (settings, train),
             "unlabelled": (replace(settings, use_gt=False), list_images(splits["train"]
                                                                         / "images"))}
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(plans))
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {sorted(plans)}")

    rows = []
    teacher_m = evaluate_coco(TorchPredictor(teacher), val, limit=args.val_limit)
    rows.append({"model": "teacher", **teacher_m, "parameters": count_parameters(teacher),
                 "macs": count_macs(teacher, args.image_size)["total"], "seconds": None})
    for run in runs:
        run_settings, data = plans[run]
        key = hash_json({"settings": asdict(run_settings), "spec": spec.to_dict()})[:12]
        workdir = args.out / f"{run}-{key}"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "settings.json").write_text(json.dumps(asdict(run_settings), indent=2))
        torch.manual_seed(0)
        student, report = distill(teacher, spec, train=data, settings=run_settings,
                                  workdir=workdir)
        m = evaluate_coco(TorchPredictor(student), val, limit=args.val_limit)
        rows.append({"model": run, **m, "parameters": count_parameters(student),
                     "macs": count_macs(student, args.image_size)["total"],
                     "seconds": report["seconds"], "settings": asdict(run_settings)})
        log.info("%s: mask AP %.4f box AP %.4f", run, m["mask_ap"], m["box_ap"])

    base = next((r for r in rows if r["model"] == "baseline"), None)
    print(f"\ndistillation on the demo: {args.student} student, {settings.steps} steps, "
          f"{args.image_size} px, {int(teacher_m['images'])} val images\n")
    header = (f"{'model':<12}{'box AP':>8}{'mask AP':>9}{'mask AP50':>10}{'params M':>10}"
              f"{'GMACs':>8}{'train s':>9}{'gap closed':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        closed = None
        if base is not None and r["model"] not in ("teacher", "baseline"):
            closed = gap_closed(teacher_m["mask_ap"], base["mask_ap"], r["mask_ap"])
            r["mask_gap_closed"] = closed
        print(f"{r['model']:<12}{r['box_ap']:>8.3f}{r['mask_ap']:>9.3f}{r['mask_ap50']:>10.3f}"
              f"{r['parameters'] / 1e6:>10.2f}{r['macs'] / 1e9:>8.2f}"
              f"{(str(round(r['seconds'])) if r['seconds'] else '-'):>9}"
              f"{(f'{100 * closed:.0f} %' if closed is not None else '-'):>12}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
