"""maskedge's entry points: ``invoke --list`` shows them, ``invoke <task> --help`` explains one.

This file only parses arguments, sets up logging and maps errors to exit codes; the work lives in
``pipeline``. A maskedge error reaches the user as one line and exit code 1 (``--debug`` shows
the traceback); a failed gate exits 2 after the report is written. Bundles, the stage cache and the
generated demo data go under ``artifacts/`` next to this file, or under ``$MASKEDGE_ARTIFACTS``
when that is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from invoke import Exit, task

REPO = Path(__file__).resolve().parent
ARTIFACTS = Path(os.environ.get("MASKEDGE_ARTIFACTS") or REPO / "artifacts").expanduser()


def _setup_logging(debug: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    # maskedge's own modules log at INFO; libraries only warnings (onnxruntime.quantization logs
    # every copied bias at INFO on the root logger), everything with --debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=debug)],
        force=True,
    )
    if not debug:
        for ours in ("pipeline", "targets", "calibration", "maskedge_runner", "tasks", "__main__"):
            logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(fn, debug: bool):
    from pipeline.errors import GateError, MaskedgeError

    _setup_logging(debug)
    try:
        return fn()
    except GateError as err:
        if debug:
            raise
        raise Exit(f"maskedge: build failed its gate: {err}", code=2) from None
    except MaskedgeError as err:
        if debug:
            raise
        raise Exit(f"maskedge: {err}", code=1) from None
    except KeyboardInterrupt:
        raise Exit("maskedge: interrupted; finished stages stay cached and no half-written "
                   "bundle was published", code=130) from None


def _path(value):
    return Path(value).expanduser() if value else None


def _number(flag: str, value, kind=int):
    """``value`` as ``kind`` (None when not given); a bad value is a ConfigError naming the flag."""
    from pipeline.errors import ConfigError

    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"--{flag}={value!r} must be {what}") from None


def _or(value, default):
    return default if value is None else value


def _flag(flag: str, value):
    from pipeline.errors import ConfigError

    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--{flag}={value!r} must be true or false")


@task(auto_shortflags=False, help={
    "target": "deployment target: arm64 (see `invoke targets`)",
    "profile": "hardware profile of the target (default: the target's own, e.g. rpi5)",
    "checkpoint": "teacher checkpoint (default: the embedded demo teacher)",
    "arch": "teacher architecture when it cannot be read off the weights "
            "(e.g. maskrcnn_resnet50_fpn)",
    "num_classes": "teacher classes including background, checked against the weights",
    "class_names": "class names: comma-separated, a text file (one per line) or a COCO json",
    "trust_checkpoint": "allow unpickling arbitrary Python objects from --checkpoint (only for "
                        "files you trust)",
    "train_coco": "COCO annotations for distillation (default: the demo train split)",
    "train_images": "image folder of --train-coco, or unlabelled images to distill from",
    "calib_images": "folder of calibration images (default: the demo calib split)",
    "calib_count": "number of calibration images to use (default 64)",
    "val_coco": "COCO annotations for validation (default: the demo val split)",
    "val_images": "image folder of --val-coco",
    "val_limit": "validate on the first N val images only",
    "student": "student backbone: mobilenet_v3_large (default) or resnet18",
    "image_size": "deployment input size in pixels, a multiple of 64 (default 256)",
    "distill_steps": "distillation steps (default: the standard budget)",
    "baseline": "also train a ground-truth-only student with the same budget, to report how "
                "much of the teacher-student gap distillation closed (default on; "
                "--no-baseline skips it)",
    "calib_method": "minmax, entropy or percentile (default: the profile's)",
    "per_channel": "per-channel weight quantization (default: the profile's)",
    "parity_budget": "max INT8 mask AP drop vs the FP32 student, in AP points (default: profile)",
    "latency_runs": "timed runs per precision for latency (default 30)",
    "strict": "fail on unreadable images instead of skipping them",
    "debug": "show full tracebacks",
})
def build(c, target="arm64", profile=None, checkpoint=None, arch=None, num_classes=None,
          class_names=None, trust_checkpoint=False, train_coco=None, train_images=None,
          calib_images=None, calib_count=64, val_coco=None, val_images=None, val_limit=None,
          student="mobilenet_v3_large", image_size=256, distill_steps=None, baseline=True,
          calib_method=None,
          per_channel=None, parity_budget=None, latency_runs=30, strict=False, debug=False):
    """Distill, quantize, convert, validate and bundle a Mask R-CNN for one edge target."""
    from pipeline.build import BuildConfig, run_build

    def go():
        config = BuildConfig(
            target=target, profile=profile, checkpoint=_path(checkpoint), arch=arch,
            num_classes=_number("num-classes", num_classes), class_names=class_names,
            trust_checkpoint=bool(trust_checkpoint),
            train_coco=_path(train_coco), train_images=_path(train_images),
            calib_images=_path(calib_images), calib_count=_number("calib-count", calib_count),
            val_coco=_path(val_coco), val_images=_path(val_images),
            val_limit=_number("val-limit", val_limit), student=student,
            image_size=_number("image-size", image_size),
            distill_steps=_number("distill-steps", distill_steps), baseline=bool(baseline),
            calib_method=calib_method, per_channel=_flag("per-channel", per_channel),
            parity_budget=_number("parity-budget", parity_budget, float),
            latency_runs=_number("latency-runs", latency_runs), strict=bool(strict),
            artifacts=ARTIFACTS,
        )
        return run_build(config)

    _run(go, debug)


@task(auto_shortflags=False, iterable=["set_"], help={
    "nproc": "processes to distill on (default 1); N > 1 re-launches through torchrun "
             "(--standalone, one node): one per GPU with CUDA, else N CPU processes with gloo",
    "steps": "distillation steps (default: the build's budget, DistillSettings.steps)",
    "student": "student backbone: mobilenet_v3_large (default) or resnet18",
    "image_size": "deployment input size in pixels, a multiple of 64 (default 256)",
    "set_": "change a DistillSettings field, NAME=VALUE (repeatable), e.g. --set batch_size=8",
    "baseline": "also train the ground-truth-only student with the same budget and report the "
                "fraction of the teacher-baseline gap distillation closed",
    "checkpoint": "teacher checkpoint (default: the embedded demo teacher)",
    "trust_checkpoint": "allow unpickling arbitrary Python objects from --checkpoint",
    "train_coco": "COCO annotations to distill on (default: the demo train split)",
    "train_images": "image folder of --train-coco, or alone: unlabelled images (pseudo-labels)",
    "val_coco": "COCO annotations to evaluate on (default: the demo val split with demo data)",
    "val_images": "image folder of --val-coco",
    "val_limit": "evaluate on the first N val images only",
    "out": "folder of the runs (default artifacts/distill); a rerun resumes or reuses them",
    "debug": "show full tracebacks",
})
def distill(c, nproc=None, steps=None, student="mobilenet_v3_large", image_size=None, set_=None,
            baseline=False, checkpoint=None, trust_checkpoint=False, train_coco=None,
            train_images=None, val_coco=None, val_images=None, val_limit=None, out=None,
            debug=False):
    """Distill the teacher into a student (resumable, optionally on N processes); print AP."""
    from pipeline.distill_cli import DistillJob, format_table, launch, title_for

    def go():
        job = DistillJob(
            artifacts=ARTIFACTS, out=_path(out) or ARTIFACTS / "distill",
            steps=_number("steps", steps), student=student,
            image_size=_or(_number("image-size", image_size), 256),
            overrides=tuple(set_ or ()),
            baseline=bool(baseline), checkpoint=_path(checkpoint),
            trust_checkpoint=bool(trust_checkpoint), train_coco=_path(train_coco),
            train_images=_path(train_images), val_coco=_path(val_coco),
            val_images=_path(val_images), val_limit=_number("val-limit", val_limit),
            nproc=_or(_number("nproc", nproc), 1),
        )
        rows = launch(job)
        if rows:
            print("\n" + format_table(rows, title_for(job, job.settings(), rows)))

    _run(go, debug)


@task(auto_shortflags=False, help={
    "steps": "training steps (default 1600)",
    "out": "where to write the teacher checkpoint (default demo/teacher.pt)",
    "debug": "show full tracebacks",
})
def train_demo(c, steps=1600, out=None, debug=False):
    """Generate the synthetic demo set and train the demo teacher on it (seeded, resumable)."""
    from pipeline.train import DEMO_TEACHER, TrainSettings, train_demo_teacher

    settings = TrainSettings(steps=int(steps))
    _run(lambda: train_demo_teacher(ARTIFACTS, settings, _path(out) or DEMO_TEACHER), debug)


@task
def targets(c):
    """List the deployment targets and their hardware profiles."""
    from rich.console import Console
    from rich.table import Table

    from targets import list_targets

    table = Table(title="maskedge targets")
    for col in ("target", "runtime", "profile", "default", "latency p90 budget"):
        table.add_column(col, no_wrap=True)
    table.add_column("notes")
    for t in list_targets():
        for p in t.profiles():
            table.add_row(t.name, t.runtime, p.name, "yes" if p.name == t.default_profile else "",
                          f"{p.latency_budget_ms:g} ms", p.description)
    Console().print(table)


@task(auto_shortflags=False,
      help={"k": "only tests matching this expression", "fast": "skip tests marked slow"})
def test(c, k=None, fast=False):
    """Run the test suite (pytest)."""
    args = [sys.executable, "-m", "pytest", "-q", "-rs"]
    if k:
        args += ["-k", k]
    if fast:
        args += ["-m", "not slow"]
    c.run(" ".join(args), pty=False)


@task(auto_shortflags=False, help={"all": "also remove the stage cache and generated demo data"})
def clean(c, all=False):
    """Remove built bundles (and with --all, every cached stage and the demo data)."""
    if not ARTIFACTS.exists():
        return
    for p in ARTIFACTS.iterdir():
        if all or p.name not in ("cache", "demo_data", "train-demo"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    print(f"cleaned {ARTIFACTS}" + (" (everything)" if all else " (bundles; cache kept)"))
