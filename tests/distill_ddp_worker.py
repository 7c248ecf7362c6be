"""One process of the 2-process distillation test (tests/test_distill_ddp.py), run by torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distill_ddp_worker.py \
        TEACHER TRAIN_DIR SETTINGS_JSON OUT

In one process group it runs, in ``OUT``:

- ``straight/``: an uninterrupted distillation with ``SETTINGS_JSON``;
- ``resumed/``: the same, stopped (KeyboardInterrupt on every process) before step 2, then run
  again so that it resumes from ``resumed/last.pt``;
- ``full/``: one step with the default loss terms (detection, imitation, RoI, mask).

and writes ``rank<r>.pt``: each run's student state dict and report, per process.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from pipeline import distill as distill_module
    from pipeline.checkpoint import load_checkpoint
    from pipeline.datasets import CocoInstances
    from pipeline.distill import DistillSettings, distill, process_group
    from pipeline.models import student_spec

    teacher_path, train_dir, settings_json, out = sys.argv[1:5]
    out_dir = Path(out)
    teacher = load_checkpoint(teacher_path).model
    train = CocoInstances(Path(train_dir) / "annotations.json", Path(train_dir) / "images")
    settings = DistillSettings(**json.loads(settings_json))
    spec = student_spec(
        num_classes=teacher.roi_heads.box_predictor.cls_score.out_features, image_size=128
    )
    real_step = distill_module._distill_step

    def stop_at_2(run, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(run, step)

    results = {}
    with process_group() as ranks:
        student, report = distill(
            teacher, spec, train=train, settings=settings, workdir=out_dir / "straight"
        )
        results["straight"] = (student.state_dict(), report)

        distill_module._distill_step = stop_at_2
        try:
            distill(teacher, spec, train=train, settings=settings, workdir=out_dir / "resumed")
        except KeyboardInterrupt:
            pass
        distill_module._distill_step = real_step
        student, report = distill(
            teacher, spec, train=train, settings=settings, workdir=out_dir / "resumed"
        )
        results["resumed"] = (student.state_dict(), report)

        full = replace(DistillSettings(), steps=1, batch_size=2, warmup_steps=1)
        student, report = distill(teacher, spec, train=train, settings=full,
                                  workdir=out_dir / "full")
        results["full"] = (student.state_dict(), report)
    torch.save(results, out_dir / f"rank{ranks.rank}.pt")


if __name__ == "__main__":
    main()
