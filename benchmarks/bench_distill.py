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
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


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

    from pipeline.checkpoint import load_checkpoint
    from pipeline.datasets import CocoInstances, list_images
    from pipeline.demo import DemoSpec, ensure_demo_data
    from pipeline.distill import DistillSettings
    from pipeline.distill_cli import compare_students, format_table, parse_overrides, run_plans
    from pipeline.errors import ConfigError
    from pipeline.models import student_spec
    from pipeline.train import DEMO_TEACHER

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    try:
        overrides = parse_overrides(args.set)
        if args.steps:
            overrides["steps"] = args.steps
        settings = replace(DistillSettings(), **overrides)
        splits = ensure_demo_data(REPO / "artifacts" / "demo_data", DemoSpec())
        train = CocoInstances(splits["train"] / "annotations.json", splits["train"] / "images")
        plans = run_plans(settings, train, list_images(splits["train"] / "images"), runs)
    except ConfigError as err:
        parser.error(str(err))
    val = CocoInstances(splits["val"] / "annotations.json", splits["val"] / "images")
    loaded = load_checkpoint(DEMO_TEACHER)
    spec = student_spec(loaded.num_classes, backbone=args.student, image_size=args.image_size)

    rows = compare_students(loaded.model, spec, plans, val=val, out=args.out,
                            val_limit=args.val_limit)
    title = (f"distillation on the demo: {args.student} student, {settings.steps} steps, "
             f"{args.image_size} px, {int(rows[0]['images'])} val images")
    print("\n" + format_table(rows, title))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
