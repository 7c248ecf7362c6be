"""The invoke entry points: help texts, and errors as one line with exit code 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _invoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name", ["build", "train-demo", "targets", "test", "clean"])
def test_every_task_has_help(name):
    out = _invoke(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "Docstring:" in out.stdout
    assert "none" not in out.stdout.split("Docstring:")[1].split("\n")[1].lower()


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope.pt"
    out = _invoke("build", "--target=arm64", f"--checkpoint={missing}")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert f"{missing}: checkpoint file not found" in out.stderr


def test_unknown_target_lists_known_ones():
    out = _invoke("build", "--target=sparc")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "arm64" in out.stderr


def test_targets_lists_profiles():
    out = _invoke("targets")
    assert out.returncode == 0, out.stderr
    for name in ("rpi4", "rpi5", "jetson_orin_nano"):
        assert name in out.stdout
