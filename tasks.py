"""maskedge's entry points: ``invoke --list`` shows them, ``invoke <task> --help`` explains one.

This file only parses arguments, sets up logging and maps errors to exit codes; the work lives in
``pipeline``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from invoke import Exit, task

REPO = Path(__file__).resolve().parent
ARTIFACTS = REPO / "artifacts"


def _setup_logging(debug: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=debug)],
        force=True,
    )


def _run(fn, debug: bool):
    from pipeline.errors import MaskedgeError

    _setup_logging(debug)
    try:
        return fn()
    except MaskedgeError as err:
        if debug:
            raise
        raise Exit(f"maskedge: {err}", code=1) from None
    except KeyboardInterrupt:
        raise Exit("maskedge: interrupted; finished stages stay cached, nothing half-written "
                   "was kept", code=130) from None


@task(help={
    "steps": "training steps (default 2600)",
    "out": "where to write the teacher checkpoint (default demo/teacher.pt)",
    "debug": "show full tracebacks",
})
def train_demo(c, steps=2600, out=None, debug=False):
    """Generate the synthetic demo set and train the demo teacher on it (seeded, resumable)."""
    from pipeline.train import DEMO_TEACHER, TrainSettings, train_demo_teacher

    settings = TrainSettings(steps=int(steps))
    _run(lambda: train_demo_teacher(ARTIFACTS, settings, Path(out) if out else DEMO_TEACHER),
         debug)
