"""``invoke distill`` and pipeline.distill_cli: options, errors as one line, run folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.distill import DistillSettings
from pipeline.distill_cli import (
    DistillJob,
    _parser,
    format_table,
    parse_overrides,
    run_plans,
    workdir_for,
)
from pipeline.errors import ConfigError, InputError
from pipeline.models import student_spec

REPO = Path(__file__).resolve().parent.parent


def _invoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "distill", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _job(tmp_path: Path, **changes) -> DistillJob:
    return DistillJob(artifacts=tmp_path, out=tmp_path / "distill", **changes)


def test_overrides_take_each_fields_type():
    out = parse_overrides(["batch_size=8", "lr=5e-4", "use_gt=false", "label_merge=union"])

    assert out == {"batch_size": 8, "lr": 5e-4, "use_gt": False, "label_merge": "union"}
    assert type(out["batch_size"]) is int and type(out["lr"]) is float


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"nproc": 3}, ConfigError, "--nproc=3 does not divide the batch of 4"),
        ({"nproc": 0}, ConfigError, "--nproc=0 must be >= 1"),
        ({"overrides": ("speed=3",)}, ConfigError, "NAME one of steps, batch_size"),
        ({"overrides": ("steps=many",)}, ConfigError, "steps must be int"),
        ({"overrides": ("use_gt=maybe",)}, ConfigError, "use_gt must be bool"),
        ({"steps": 5, "overrides": ("steps=6",)}, ConfigError, "disagree"),
        ({"image_size": 100}, ConfigError, "multiple of 64"),
        ({"image_size": 0}, ConfigError, "multiple of 64"),
        ({"student": "vgg16"}, ConfigError, "unknown backbone 'vgg16'"),
        ({"checkpoint": Path("/no/such.pt")}, InputError, "checkpoint file not found"),
        ({"train_coco": Path(__file__)}, ConfigError, "--train-coco needs --train-images"),
        ({"train_images": REPO, "baseline": True}, ConfigError, "--baseline trains on ground"),
        ({"val_coco": Path(__file__)}, ConfigError, "--val-coco and --val-images go together"),
    ],
)
def test_bad_options_name_the_option(tmp_path, changes, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        _job(tmp_path, **changes)


def test_job_survives_the_relaunch_to_torchrun(tmp_path):
    job = _job(tmp_path, steps=7, student="resnet18", image_size=128, baseline=True,
               overrides=("batch_size=4", "feature_weight=2.0"), val_limit=3, nproc=2)

    args = _parser().parse_args(job.to_argv())

    assert args.steps == 7 and args.student == "resnet18" and args.image_size == 128
    assert args.set == ["batch_size=4", "feature_weight=2.0"] and args.baseline
    assert args.out == job.out and args.artifacts == job.artifacts and args.val_limit == 3
    assert job.settings() == DistillSettings(steps=7, batch_size=4, feature_weight=2.0)


def test_run_folders_are_named_by_run_and_settings(tmp_path):
    settings = DistillSettings(steps=10)
    spec = student_spec(4, image_size=128)
    plans = run_plans(settings, "labelled", [Path("a.png")], ["baseline", "distilled",
                                                              "unlabelled"])

    folders = {run: workdir_for(tmp_path, run, s, spec) for run, (s, _) in plans.items()}

    assert plans["baseline"][0].label_merge == "gt_only" and not plans["baseline"][0].uses_teacher
    assert plans["unlabelled"] == (DistillSettings(steps=10, use_gt=False), [Path("a.png")])
    for run, folder in folders.items():
        assert folder.parent == tmp_path
        name, key = folder.name.rsplit("-", 1)
        assert name == run and len(key) == 12
    assert workdir_for(tmp_path, "distilled", DistillSettings(steps=11), spec) != folders[
        "distilled"
    ]


def test_table_shows_gap_closed_and_dashes():
    rows = [
        {"model": "teacher", "box_ap": 0.6, "mask_ap": 0.5, "mask_ap50": 0.7,
         "parameters": 14e6, "macs": 3e9, "seconds": None},
        {"model": "baseline", "box_ap": 0.2, "mask_ap": 0.1, "mask_ap50": 0.2,
         "parameters": 5e6, "macs": 1e9, "seconds": 30.0},
        {"model": "distilled", "box_ap": 0.5, "mask_ap": 0.4, "mask_ap50": 0.6,
         "parameters": 5e6, "macs": 1e9, "seconds": 31.0, "mask_gap_closed": 0.75},
    ]

    lines = format_table(rows, "title").splitlines()

    assert lines[0] == "title"
    assert lines[-1].split() == ["distilled", "0.500", "0.400", "0.600", "5.00", "1.00", "31",
                                 "75", "%"]
    assert lines[-3].split()[-2:] == ["-", "-"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "3"], "maskedge: --nproc=3 does not divide the batch of 4 images"),
        (["--nproc", "two"], "maskedge: --nproc='two' must be an integer"),
        (["--set", "lr=fast"], "maskedge: --set 'lr=fast': lr must be float"),
    ],
)
def test_invoke_distill_errors_are_one_line(args, message):
    out = _invoke(*args)

    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_invoke_distill_has_help():
    out = _invoke("--help")

    assert out.returncode == 0, out.stderr
    for flag in ("--nproc", "--steps", "--set", "--baseline", "--train-images", "--out"):
        assert flag in out.stdout
