"""Distillation on 2 processes (torchrun, gloo on CPU) against one process on the same batches.

The weight comparison trains without torchvision's detection losses (their RoI sampling draws
from each process's own random stream, and the mask loss averages over a shard's positive RoIs):
there, with global-batch BatchNorm statistics, the 2-process run is the 1-process run up to
float rounding. With every default term, the first step's distillation losses (batch means over
object cells, RoIs and detection scores) must equal the 1-process figures. The worker
(tests/distill_ddp_worker.py) also stops and resumes a run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.datasets import CocoInstances
from pipeline.distill import DistillSettings, copy_matching_parameters, distill
from pipeline.models import build_model, student_spec

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distill_ddp_worker.py"
TEACHER = Path(os.environ.get("MASKEDGE_TEST_TEACHER", REPO / "demo" / "teacher.pt"))
# no detection losses; heads copied from the teacher, the body and the mask head train
EXACT = {
    "steps": 3,
    "batch_size": 2,
    "warmup_steps": 1,
    "checkpoint_every": 2,
    "lr": 1e-3,
    "detection_weight": 0.0,
    "channel_weight": 1.0,
}
# |2-process - 1-process| / |1-process - initial| over all weights: measured 6e-4 (Adam turns
# rounding in near-zero gradients into full-size steps); per-process BatchNorm statistics gave 0.2
UPDATE_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def two_process_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(TEACHER), str(demo_data["train"]), json.dumps(EXACT), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return ranks, out


@pytest.fixture(scope="module")
def one_process_run(demo_teacher, demo_data, tmp_path_factory):
    teacher = demo_teacher.model
    train = CocoInstances(demo_data["train"] / "annotations.json", demo_data["train"] / "images")
    spec = student_spec(teacher.roi_heads.box_predictor.cls_score.out_features, image_size=128)
    settings = DistillSettings(**EXACT)
    torch.manual_seed(settings.seed)
    initial = build_model(spec)
    copy_matching_parameters(teacher, initial)
    workdir = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process; 2 threads on 2 busy cores are slower
    try:
        student, report = distill(teacher, spec, train=train, settings=settings, workdir=workdir)
        full = replace(DistillSettings(), steps=1, batch_size=2, warmup_steps=1)
        _, full_report = distill(teacher, spec, train=train, settings=full,
                                 workdir=tmp_path_factory.mktemp("one_process_full"))
    finally:
        torch.set_num_threads(threads)
    return initial.state_dict(), student.state_dict(), report, full_report


def test_processes_end_with_identical_weights(two_process_run):
    (rank0, rank1), _ = two_process_run

    for run in ("straight", "resumed", "full"):
        state0, report0 = rank0[run]
        state1, report1 = rank1[run]
        assert state0.keys() == state1.keys()
        different = [k for k in state0 if not torch.equal(state0[k], state1[k])]
        assert not different, (run, different[:5])
        assert report0["processes"] == 2
        assert report0["final_losses"] == report1["final_losses"]
    # every default term ran on both processes
    losses = rank0["full"][1]["final_losses"]
    assert {"loss_mask", "feature", "logit_kl", "box_kd", "mask_kd"} <= set(losses)


def test_interrupted_two_process_run_resumes_to_the_same_weights(two_process_run):
    (rank0, _), out = two_process_run
    straight, straight_report = rank0["straight"]
    resumed, resumed_report = rank0["resumed"]

    assert resumed_report["resumed_from_step"] == 2
    assert straight_report["resumed_from_step"] == 0
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert resumed_report["final_losses"] == straight_report["final_losses"]
    # the first process wrote the state, and says so
    state = torch.load(out / "resumed" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and state["processes"] == 2


def test_two_processes_match_one_process_on_the_same_batches(two_process_run, one_process_run):
    (rank0, _), _ = two_process_run
    initial, single, single_report, _ = one_process_run
    ddp, ddp_report = rank0["straight"]

    diff = update = 0.0
    for k, v in single.items():
        if not v.is_floating_point():
            assert torch.equal(ddp[k], v), k  # BatchNorm step counters
            continue
        diff += float((ddp[k].double() - v.double()).pow(2).sum())
        update += float((v.double() - initial[k].double()).pow(2).sum())
    assert update > 0
    assert (diff / update) ** 0.5 < UPDATE_TOLERANCE, (diff / update) ** 0.5
    # the logged losses are the whole batch's: per-process figures averaged
    for term, value in single_report["final_losses"].items():
        assert ddp_report["final_losses"][term] == pytest.approx(value, rel=1e-4, abs=1e-4), term


def test_distillation_losses_are_whole_batch_means(two_process_run, one_process_run):
    (rank0, _), _ = two_process_run
    single = one_process_run[3]["final_losses"]
    ddp = rank0["full"][1]["final_losses"]

    for term in ("feature", "logit_kl", "box_kd", "mask_kd", "pseudo_labels_per_image"):
        assert ddp[term] == pytest.approx(single[term], rel=1e-3), term
