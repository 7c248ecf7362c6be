"""``invoke distill``: distill students, on one process or many, and compare them on val.

    python -m pipeline.distill_cli [--steps N] [--student NAME] [--image-size N]
        [--set NAME=VALUE ...] [--baseline] [--checkpoint FILE [--trust-checkpoint]]
        [--train-coco FILE --train-images DIR | --train-images DIR]
        [--val-coco FILE --val-images DIR] [--val-limit N] [--out DIR]

Distills the teacher (default: the demo teacher ``demo/teacher.pt``) into a student on the
training data (default: the demo train split; ``--train-images`` alone: unlabelled images, teacher
pseudo-labels only) with :class:`pipeline.distill.DistillSettings` (the build's defaults,
changed by ``--steps`` and ``--set``). With ``--baseline`` it also trains the ground-truth-only
student with the same budget (:func:`pipeline.distill.baseline_settings`). Then it evaluates the
teacher and each student in PyTorch on the val set (the demo val split when training on the demo;
``--val-coco``; none otherwise) and prints box/mask AP, parameters, MACs and the fraction of the
teacher-baseline gap closed (:func:`pipeline.distill.gap_closed`).

Writes, per student, ``<out>/<run>-<hash12>/`` (``settings.json`` and the resumable
``last.pt``; the hash covers the settings and the student architecture, so the same command
resumes an interrupted run and reuses a finished one) and ``<out>/table.json``.

:func:`launch` with ``nproc`` > 1 runs this module under torchrun (``--standalone``, one node):
every process trains its slice of each batch (:mod:`pipeline.distill`), and only the first
evaluates, writes and prints. ``benchmarks/bench_distill.py`` uses the same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError, MaskedgeError

log = logging.getLogger("pipeline.distill_cli" if __name__ == "__main__" else __name__)

REPO = Path(__file__).resolve().parent.parent
RUNS = ("baseline", "distilled", "unlabelled")


def parse_overrides(items: typing.Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` texts -> DistillSettings fields, each value read as its field's type."""
    from pipeline.distill import DistillSettings

    hints = typing.get_type_hints(DistillSettings)
    names = [f.name for f in fields(DistillSettings)]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or key not in hints:
            raise ConfigError(
                f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}"
            )
        kind = hints[key]
        try:
            if kind is bool:
                lowered = text.lower()
                if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(text)
                out[key] = lowered in ("1", "true", "yes", "on")
            else:
                out[key] = kind(text)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {key} must be {kind.__name__}") from None
    return out


def run_plans(
    settings: Any, labelled: Any, unlabelled: list[Path] | None, runs: typing.Sequence[str]
) -> dict[str, tuple[Any, Any]]:
    """``run name -> (settings, training data)`` for the students named by ``runs``.

    ``baseline``: ground truth alone; ``distilled``: ``settings`` on ``labelled`` (a COCO set, or
    image files); ``unlabelled``: ``settings`` without ground truth on the ``unlabelled`` images.
    """
    from pipeline.distill import baseline_settings

    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise ConfigError(f"unknown runs {unknown}; choose from {list(RUNS)}")
    plans: dict[str, tuple[Any, Any]] = {}
    for run in runs:
        if run == "baseline":
            plans[run] = (baseline_settings(settings), labelled)
        elif run == "distilled":
            plans[run] = (settings, labelled)
        else:
            if unlabelled is None:
                raise ConfigError("the unlabelled run needs a folder of training images")
            plans[run] = (replace(settings, use_gt=False), unlabelled)
    return plans


def workdir_for(out: Path, run: str, settings: Any, spec: Any) -> Path:
    """``<out>/<run>-<hash12>``: the hash covers the settings and the student architecture."""
    from pipeline.cache import hash_json

    key = hash_json({"settings": asdict(settings), "spec": spec.to_dict()})[:12]
    return out / f"{run}-{key}"


def compare_students(
    teacher: Any,
    spec: Any,
    plans: dict[str, tuple[Any, Any]],
    *,
    val: Any | None,
    out: Path,
    val_limit: int | None = None,
) -> list[dict[str, Any]]:
    """Train every planned student, then evaluate the teacher and each one on ``val``.

    Returns one row per model (teacher first): box/mask AP (none without ``val``), parameters,
    MACs, training seconds, settings, workdir, and for students other than the baseline the
    fraction of the teacher-baseline mask-AP gap closed. Under torchrun every process trains and
    only the first evaluates (the others return no rows).
    """
    import torch.distributed as dist

    from pipeline.distill import distill, gap_closed
    from pipeline.evaluate import TorchPredictor, evaluate_coco
    from pipeline.models import count_macs, count_parameters

    main = not dist.is_initialized() or dist.get_rank() == 0
    trained = []
    for run, (settings, data) in plans.items():
        workdir = workdir_for(out, run, settings, spec)
        if main:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
        student, report = distill(teacher, spec, train=data, settings=settings, workdir=workdir)
        trained.append((run, student, report, workdir))
    if not main:
        return []

    def row(name: str, model: Any, report: dict[str, Any] | None) -> dict[str, Any]:
        metrics = evaluate_coco(TorchPredictor(model), val, limit=val_limit) if val else {}
        if metrics:
            log.info("%s: box AP %.4f, mask AP %.4f", name, metrics["box_ap"], metrics["mask_ap"])
        return {
            "model": name,
            **metrics,
            "parameters": count_parameters(model),
            "macs": count_macs(model, spec.image_size)["total"],
            "seconds": report["seconds"] if report else None,
            "processes": report["processes"] if report else None,
        }

    rows = [row("teacher", teacher, None)]
    for run, student, report, workdir in trained:
        rows.append({**row(run, student, report), "settings": report["settings"],
                     "workdir": str(workdir)})
    base = next((r for r in rows if r["model"] == "baseline"), None)
    for r in rows[1:]:
        if base is not None and r is not base and "mask_ap" in r:
            r["mask_gap_closed"] = gap_closed(rows[0]["mask_ap"], base["mask_ap"], r["mask_ap"])
    return rows


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    """The comparison as text: one line per model, ``-`` where a figure does not apply."""

    def num(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (f"{'model':<12}{'box AP':>8}{'mask AP':>9}{'mask AP50':>10}{'params M':>10}"
              f"{'GMACs':>8}{'train s':>9}{'gap closed':>12}")
    lines = [title, "", header, "-" * len(header)]
    for r in rows:
        closed = r.get("mask_gap_closed")
        lines.append(
            f"{r['model']:<12}{num(r.get('box_ap'), '.3f'):>8}{num(r.get('mask_ap'), '.3f'):>9}"
            f"{num(r.get('mask_ap50'), '.3f'):>10}{r['parameters'] / 1e6:>10.2f}"
            f"{r['macs'] / 1e9:>8.2f}{num(r['seconds'], '.0f'):>9}"
            f"{(f'{100 * closed:.0f} %' if closed is not None else '-'):>12}"
        )
    if rows and "mask_ap" not in rows[0]:
        lines.append("(no val set: give --val-coco and --val-images to measure AP)")
    return "\n".join(lines)


@dataclass(frozen=True)
class DistillJob:
    """What ``invoke distill`` was asked to do, checked on construction (cheaply, before any
    process is started) so that a bad option fails with one clear line."""

    artifacts: Path
    out: Path
    steps: int | None = None
    student: str = "mobilenet_v3_large"
    image_size: int = 256
    overrides: tuple[str, ...] = ()
    baseline: bool = False
    checkpoint: Path | None = None
    trust_checkpoint: bool = False
    train_coco: Path | None = None
    train_images: Path | None = None
    val_coco: Path | None = None
    val_images: Path | None = None
    val_limit: int | None = None
    nproc: int = 1

    def __post_init__(self) -> None:
        from pipeline.models import student_spec

        if self.image_size < 64:
            raise ConfigError(f"--image-size={self.image_size} must be a multiple of 64, >= 64")
        student_spec(2, backbone=self.student, image_size=self.image_size)  # ConfigError if bad
        if self.nproc < 1:
            raise ConfigError(f"--nproc={self.nproc} must be >= 1")
        if self.val_limit is not None and self.val_limit < 1:
            raise ConfigError(f"--val-limit={self.val_limit} must be >= 1")
        settings = self.settings()
        if settings.batch_size % self.nproc:
            raise ConfigError(
                f"--nproc={self.nproc} does not divide the batch of {settings.batch_size} "
                "images; every process takes an equal share of each batch, so choose an "
                f"--nproc that divides it or --set batch_size=<a multiple of {self.nproc}>"
            )
        self._check_paths()
        if self.baseline and self.train_images is not None and self.train_coco is None:
            raise ConfigError(
                "--baseline trains on ground truth alone, which --train-images without "
                "--train-coco does not have; add --train-coco or drop --baseline"
            )

    def _check_paths(self) -> None:
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise InputError(f"--checkpoint={self.checkpoint}: checkpoint file not found")
        for flag, path, folder in (
            ("train-coco", self.train_coco, False),
            ("train-images", self.train_images, True),
            ("val-coco", self.val_coco, False),
            ("val-images", self.val_images, True),
        ):
            if path is None:
                continue
            if not (path.is_dir() if folder else path.is_file()):
                raise InputError(f"--{flag}={path}: {'folder' if folder else 'file'} not found")
        if self.train_coco is not None and self.train_images is None:
            raise ConfigError("--train-coco needs --train-images (the folder of its images)")
        if (self.val_coco is None) != (self.val_images is None):
            raise ConfigError("--val-coco and --val-images go together; give both or neither")

    def settings(self) -> Any:
        """The distilled student's settings: the defaults, ``--steps``, then ``--set``."""
        from pipeline.distill import DistillSettings

        changes = parse_overrides(self.overrides)
        if self.steps is not None:
            if changes.get("steps", self.steps) != self.steps:
                raise ConfigError(
                    f"--steps={self.steps} and --set steps={changes['steps']} disagree; give "
                    "the step budget once"
                )
            changes["steps"] = self.steps
        return DistillSettings(**changes)

    def to_argv(self) -> list[str]:
        """The command-line arguments of :func:`main` that rebuild this job."""
        argv = ["--artifacts", str(self.artifacts), "--out", str(self.out),
                "--student", self.student, "--image-size", str(self.image_size)]
        if self.steps is not None:
            argv += ["--steps", str(self.steps)]
        for item in self.overrides:
            argv += ["--set", item]
        if self.baseline:
            argv.append("--baseline")
        if self.trust_checkpoint:
            argv.append("--trust-checkpoint")
        for flag, value in (("--checkpoint", self.checkpoint), ("--train-coco", self.train_coco),
                            ("--train-images", self.train_images), ("--val-coco", self.val_coco),
                            ("--val-images", self.val_images), ("--val-limit", self.val_limit)):
            if value is not None:
                argv += [flag, str(value)]
        return argv


def run_job(job: DistillJob) -> list[dict[str, Any]]:
    """Train and compare the job's students in this process (one of torchrun's, or alone).

    Returns the table rows on the first process (and writes ``<out>/table.json``), none on the
    others.
    """
    from pipeline.checkpoint import load_checkpoint
    from pipeline.datasets import CocoInstances, list_images
    from pipeline.demo import DemoSpec, ensure_demo_data
    from pipeline.distill import process_group
    from pipeline.models import student_spec
    from pipeline.train import DEMO_TEACHER

    settings = job.settings()
    with process_group() as ranks:
        loaded = load_checkpoint(job.checkpoint or DEMO_TEACHER, trust=job.trust_checkpoint)
        spec = student_spec(loaded.num_classes, backbone=job.student, image_size=job.image_size)
        val = None
        if job.train_images is None:
            if ranks.main:
                ensure_demo_data(job.artifacts / "demo_data", DemoSpec())
            if ranks.distributed:
                import torch.distributed as dist

                dist.barrier()  # the first process generates the demo set once
            splits = ensure_demo_data(job.artifacts / "demo_data", DemoSpec())
            train: Any = CocoInstances(splits["train"] / "annotations.json",
                                       splits["train"] / "images")
            val = CocoInstances(splits["val"] / "annotations.json", splits["val"] / "images")
        elif job.train_coco is not None:
            train = CocoInstances(job.train_coco, job.train_images)
        else:
            train = list_images(job.train_images)
        if job.val_coco is not None and job.val_images is not None:
            val = CocoInstances(job.val_coco, job.val_images)
        runs = ("baseline", "distilled") if job.baseline else ("distilled",)
        plans = run_plans(settings, train, None, runs)
        rows = compare_students(loaded.model, spec, plans, val=val, out=job.out,
                                val_limit=job.val_limit)
    if rows:
        job.out.mkdir(parents=True, exist_ok=True)
        (job.out / "table.json").write_text(json.dumps(rows, indent=2, default=str))
        if val is None:
            log.info("no val set (--val-coco/--val-images): AP not measured")
    return rows


def title_for(job: DistillJob, settings: Any, rows: list[dict[str, Any]]) -> str:
    """The table's first line: student, budget, size, val images and processes."""
    images = rows[0].get("images") if rows else None
    parts = [f"distillation: {job.student} student", f"{settings.steps} steps",
             f"{job.image_size} px"]
    if images:
        parts.append(f"{int(images)} val images")
    if job.nproc > 1:
        parts.append(f"{job.nproc} processes")
    return ", ".join(parts)


def launch(job: DistillJob) -> list[dict[str, Any]] | None:
    """Run ``job``: here when ``job.nproc`` is 1, else on ``job.nproc`` torchrun processes.

    The multi-process run is torchrun's launcher (``python -m torch.distributed.run
    --standalone --nproc_per_node N -m pipeline.distill_cli ...``), run from this process so that
    a failed worker ends in one :class:`MaskedgeError` line rather than torchrun's report; the
    first worker prints the table. Returns the rows of a one-process run, None otherwise.
    """
    if job.nproc == 1:
        return run_job(job)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.nproc)))
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # our own line follows
    args = parse_args(["--standalone", f"--nproc_per_node={job.nproc}",
                       "-m", "pipeline.distill_cli", *job.to_argv()])
    log.info("starting %d distillation processes (torchrun --standalone)", job.nproc)
    try:
        run(args)
    except ChildFailedError as err:
        first = min(err.failures.items())[1] if err.failures else None
        code = f" (exit code {first.exitcode})" if first else ""
        raise MaskedgeError(
            f"distillation failed on {len(err.failures)} of {job.nproc} processes{code}; the "
            "first one's error is above"
        ) from None
    return None


def _parser() -> argparse.ArgumentParser:
    default_artifacts = Path(os.environ.get("MASKEDGE_ARTIFACTS") or REPO / "artifacts")
    parser = argparse.ArgumentParser(prog="python -m pipeline.distill_cli",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--artifacts", type=Path, default=default_artifacts)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--student", default="mobilenet_v3_large")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--trust-checkpoint", action="store_true")
    for flag in ("--train-coco", "--train-images", "--val-coco", "--val-images"):
        parser.add_argument(flag, type=Path, default=None)
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--debug", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of one process: ``python -m pipeline.distill_cli`` (what torchrun starts)."""
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%X")
    try:
        job = DistillJob(
            artifacts=args.artifacts, out=args.out or args.artifacts / "distill",
            steps=args.steps, student=args.student, image_size=args.image_size,
            overrides=tuple(args.set), baseline=args.baseline, checkpoint=args.checkpoint,
            trust_checkpoint=args.trust_checkpoint, train_coco=args.train_coco,
            train_images=args.train_images, val_coco=args.val_coco, val_images=args.val_images,
            val_limit=args.val_limit, nproc=int(os.environ.get("WORLD_SIZE", "1") or 1),
        )
        rows = run_job(job)
    except MaskedgeError as err:
        if args.debug:
            raise
        where = f" (process {rank})" if "WORLD_SIZE" in os.environ else ""
        print(f"maskedge{where}: {err}", file=sys.stderr)
        return 1
    if rows:
        print("\n" + format_table(rows, title_for(job, job.settings(), rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
