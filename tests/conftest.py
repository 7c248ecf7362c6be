"""Shared fixtures: the demo teacher, a tiny random-weight student, and a small demo set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "demo" / "teacher.pt"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_teacher():
    """The committed, trained demo teacher (a real detector), in eval mode on CPU."""
    from pipeline.checkpoint import load_checkpoint

    path = Path(os.environ.get("MASKEDGE_TEST_TEACHER", DEMO_TEACHER))
    return load_checkpoint(path)


@pytest.fixture(scope="session")
def tiny_student():
    """A random-weight MobileNetV3 student at 128 px: fast, for shapes and plumbing."""
    from pipeline.models import build_model, student_spec

    torch.manual_seed(0)
    model = build_model(student_spec(num_classes=4, image_size=128))
    return model.eval()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo set (train 8, calib 4, val 6 images) generated once per test session."""
    from pipeline.demo import DemoSpec, ensure_demo_data

    root = tmp_path_factory.mktemp("demo_data")
    return ensure_demo_data(root, DemoSpec(train_images=8, calib_images=4, val_images=6))
