"""The one module that knows the order of the stages of ``invoke build``.

    load teacher -> distill student -> export static graphs -> calibrate -> quantize
    -> validate parity (through the bundle's own runner) -> profile latency (own process)
    -> gate -> bundle

Reads: the teacher checkpoint (default ``demo/teacher.pt``), a training set for distillation
(COCO or an unlabelled image folder; default the demo train split), a calibration image set
(default the demo calib split) and a COCO validation set (default the demo val split).
Writes: ``artifacts/cache/<stage>-<key>/`` for every finished stage (a rerun or another target
reuses them and says so) and the bundle ``artifacts/<target>/`` (see :mod:`pipeline.bundle`).

Known limits: latency is measured on the build host with the profile's thread count; it gates
the build only when the host is the profile's kind of machine (same CPU architecture), otherwise
it is reported and marked "not gated". Images are processed one at a time (batch size 1).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.cache import StageCache, hash_json, sha256_file, sha256_files
from pipeline.errors import ConfigError, GateError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "demo" / "teacher.pt"


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``invoke build`` was asked to do; recorded in the manifest."""

    target: str = "arm64"
    profile: str | None = None
    checkpoint: Path | None = None
    train_coco: Path | None = None
    train_images: Path | None = None
    calib_images: Path | None = None
    calib_count: int = 64
    val_coco: Path | None = None
    val_images: Path | None = None
    val_limit: int | None = None
    student: str = "mobilenet_v3_large"
    image_size: int = 256
    distill_steps: int | None = None
    calib_method: str | None = None
    per_channel: bool | None = None
    parity_budget: float | None = None
    latency_runs: int = 30
    latency_warmup: int = 5
    strict: bool = False
    artifacts: Path = REPO / "artifacts"
    demo_spec: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.val_coco is None) != (self.val_images is None):
            raise ConfigError("--val-coco and --val-images go together: give both or neither")
        if self.train_coco is not None and self.train_images is None:
            raise ConfigError("--train-coco needs --train-images (the folder its images are in)")
        if self.calib_count < 1:
            raise ConfigError(f"--calib-count={self.calib_count} must be >= 1")
        if self.latency_runs < 1:
            raise ConfigError(f"--latency-runs={self.latency_runs} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


class _Stages:
    """Timing and cache bookkeeping shared by the stages of one build."""

    def __init__(self, cache: StageCache) -> None:
        self.cache = cache
        self.record: dict[str, dict[str, Any]] = {}

    def begin(self, name: str) -> float:
        log.info("[%s] started", name)
        return time.perf_counter()

    def end(self, name: str, t0: float, cached: bool, path: Path | None, headline: str) -> None:
        seconds = round(time.perf_counter() - t0, 1)
        self.record[name] = {"seconds": seconds, "cached": cached,
                             "path": str(path) if path else None, "headline": headline}
        how = "reused from cache" if cached else "done"
        log.info("[%s] %s in %.1fs: %s%s", name, how, seconds, headline,
                 f" ({path})" if path else "")


def run_build(config: BuildConfig) -> dict[str, Any]:
    """Run every stage for ``config``; returns the manifest. Raises GateError on a failed gate."""
    raise NotImplementedError
