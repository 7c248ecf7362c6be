"""The deployable bundle: ``artifacts/<target>/``, written atomically.

A bundle is assembled in a staging folder beside its final place (``artifacts/.staging-*``),
then swapped in with renames, so ``artifacts/<target>/`` is always either the previous complete
bundle or the new complete one — an interrupted or failed build never leaves a half-written
bundle there. Layout::

    artifacts/<target>/
        manifest.json            what this is, how it was built, what it measured, file hashes
        report.md                the build report for people
        graph_spec.json          host-code parameters of the static graphs
        models/fp32/*.onnx       reference graphs
        models/int8/*.onnx       the graphs to deploy
        maskedge_runner/         the runtime-only runner (numpy + Pillow + the runtime)
        maskedge-<target>.tar.gz the whole bundle (only when the build passed its gates)

``manifest.json["status"]`` is ``"passed"`` only when every gate passed. A build that fails a
gate is published to ``artifacts/<target>-failed/`` instead (report and models kept for
inspection, ``"failed"`` with the reasons, no tarball), so the last bundle that passed stays in
``artifacts/<target>/`` untouched; the next passing build removes the ``-failed`` folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from pipeline.cache import owner_alive, sha256_file

log = logging.getLogger(__name__)

RUNNER_SOURCE = Path(__file__).resolve().parent.parent / "maskedge_runner"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RUNNER_SOURCE.parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=RUNNER_SOURCE.parent, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def new_staging(artifacts: Path, target: str) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    for old in artifacts.glob(f".staging-{target}-*"):
        if not owner_alive(old.name):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".staging-{target}-pid{os.getpid()}-", dir=artifacts))


def copy_runner(staging: Path) -> None:
    shutil.copytree(RUNNER_SOURCE, staging / "maskedge_runner",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and not p.name.endswith(".tar.gz")
    }


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_tarball(staging: Path, target: str) -> Path:
    name = f"maskedge-{target}.tar.gz"
    tmp = staging / (name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(staging.rglob("*")):
            if p.is_file() and not p.name.startswith(name):
                tar.add(p, arcname=f"maskedge-{target}/{p.relative_to(staging)}")
    final = staging / name
    os.replace(tmp, final)
    return final


def failed_path(final: Path) -> Path:
    """Where a bundle that failed its gate goes, beside the last one that passed."""
    return final.with_name(f"{final.name}-failed")


def publish(staging: Path, final: Path) -> Path:
    """Swap the staging folder into ``final``; the previous bundle is removed only afterwards.

    The folder becomes readable by everyone (the staging folder is created owner-only), so a
    deploy account or CI job can pick the bundle up.
    """
    staging.chmod(0o755)
    previous = None
    if final.exists():
        previous = final.with_name(f".previous-{final.name}-{os.getpid()}")
        os.replace(final, previous)
    os.replace(staging, final)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return final
