"""Images in every mode Pillow reads become the model's RGB input; unreadable ones are named.

Case from ../shared/cases: B29 (grayscale JPEG, RGBA PNG, 2-channel LA PNG in one folder).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from maskedge_runner import preprocess
from maskedge_runner.preprocess import ImageReadError, letterbox, load_image, to_rgb
from pipeline.datasets import DataQuality, list_images, read_images
from pipeline.errors import DatasetError

H, W = 12, 16


@pytest.fixture(autouse=True)
def _fresh_mode_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Conversions are logged once per mode per process; start each test afresh."""
    monkeypatch.setattr(preprocess, "_modes_seen", set())
    yield


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


def _gray_jpeg(p: Path) -> Path:
    return _save(Image.new("L", (W, H), 100), p / "gray.jpg", quality=95)


def _rgba_png(p: Path) -> Path:
    return _save(Image.new("RGBA", (W, H), (10, 20, 30, 0)), p / "rgba.png")


def _la_png(p: Path) -> Path:
    return _save(Image.new("LA", (W, H), (100, 50)), p / "la.png")


def _png16(p: Path) -> Path:
    arr = np.full((H, W), 30000, np.uint16)
    arr[0, 0] = 65535
    return _save(Image.fromarray(arr), p / "deep.png")


def _palette_png(p: Path) -> Path:
    im = Image.new("P", (W, H), 1)
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    return _save(im, p / "palette.png", transparency=0)


def _cmyk_jpeg(p: Path) -> Path:
    return _save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), p / "cmyk.jpg", quality=95)


def _bilevel_png(p: Path) -> Path:
    return _save(Image.new("1", (W, H), 1), p / "mono.png")


def _float_tiff(p: Path) -> Path:
    return _save(Image.fromarray(np.full((H, W), 0.5, np.float32)), p / "float.tif")


@pytest.mark.parametrize(
    ("make", "mode", "rgb", "rule"),
    [
        (_gray_jpeg, "L", (100, 100, 100), "Pillow's conversion"),
        (_rgba_png, "RGBA", (10, 20, 30), "alpha dropped"),
        (_la_png, "LA", (100, 100, 100), "alpha dropped"),
        (_png16, "I;16", (117, 117, 117), "16-bit scaled by bit depth"),
        (_palette_png, "P", (200, 100, 50), "palette with transparency"),
        (_cmyk_jpeg, "CMYK", (255, 0, 0), "Pillow's conversion"),
        (_bilevel_png, "1", (255, 255, 255), "Pillow's conversion"),
        (_float_tiff, "F", (128, 128, 128), "float in [0, 1]"),
    ],
)
def test_b29_every_mode_becomes_rgb(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[Path], Path],
    mode: str,
    rgb: tuple[int, int, int],
    rule: str,
) -> None:
    """B29: grayscale JPEG, RGBA PNG, LA PNG and the other modes: 3-channel RGB, logged."""
    path = make(tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode

    with caplog.at_level(logging.INFO, logger="maskedge_runner.preprocess"):
        image = load_image(path)

    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image[H // 2, W // 2], rgb, atol=2)  # JPEG is lossy
    assert f"converting {mode}-mode images to RGB ({rule}" in caplog.text
    assert str(path) in caplog.text


def test_b29_mixed_folder_all_rgb(tmp_path: Path) -> None:
    """B29: one folder holding a grayscale JPEG, an RGBA PNG and an LA PNG."""
    for make in (_gray_jpeg, _rgba_png, _la_png, _png16):
        make(tmp_path)
    quality = DataQuality(source=str(tmp_path))

    kept, arrays = read_images(list_images(tmp_path), quality=quality)

    assert len(kept) == 4 and quality.images == 4 and quality.images_skipped == 0
    assert all(a.shape == (H, W, 3) and a.dtype == np.uint8 for a in arrays)
    x, _ = letterbox(arrays[0], 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32


def test_sixteen_bit_is_scaled_by_depth_not_stretched() -> None:
    """A dim 16-bit image stays dim: no per-image contrast stretch."""
    dim = Image.fromarray(np.full((2, 2), 1000, np.uint16))
    assert to_rgb(dim)[0, 0, 0] == 4
    full = Image.fromarray(np.array([[0, 65535]], np.uint16))
    np.testing.assert_array_equal(to_rgb(full)[0, :, 0], [0, 255])


def test_conversion_logged_once_per_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = _gray_jpeg(tmp_path), _save(Image.new("L", (W, H)), tmp_path / "b.png")
    with caplog.at_level(logging.INFO, logger="maskedge_runner.preprocess"):
        load_image(first)
        load_image(second)
    assert caplog.text.count("converting L-mode images") == 1


def _truncated_jpeg(p: Path) -> Path:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = p / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _truncated_png(p: Path) -> Path:
    rng = np.random.default_rng(0)
    path = _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), p / "c.png")
    path.write_bytes(path.read_bytes()[:-2000])
    return path


@pytest.mark.parametrize("make", [_truncated_jpeg, _truncated_png])
def test_truncated_even_when_pillow_is_told_to_allow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[Path], Path]
) -> None:
    """Truncated files are never padded with grey, whatever a host application configured."""
    path = make(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    with pytest.raises(ImageReadError) as err:
        load_image(path)

    assert str(path) in str(err.value) and "remove or replace it" in str(err.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the host's setting is restored


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.png", b"", "cannot read image"),
        ("text.jpg", b"hello, not an image", "cannot read image"),
        ("gone.png", None, "image file not found"),
        ("photos", "folder", "is a folder; give one image file"),
    ],
)
def test_unreadable_files_name_the_file(
    tmp_path: Path, name: str, content: bytes | str | None, expected: str
) -> None:
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert str(err.value).startswith(f"{path}: {expected}")


def test_unreadable_files_skipped_with_count_or_fatal_when_strict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _rgba_png(tmp_path)
    bad = _truncated_jpeg(tmp_path)
    quality = DataQuality(source=str(tmp_path))

    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        kept, arrays = read_images([bad, good], quality=quality)

    assert kept == [good] and arrays[0].shape == (H, W, 3)
    assert quality.images_skipped == 1 and quality.skipped == {"image_unreadable": 1}
    assert f"skipping {bad}: cannot read image" in caplog.text
    with pytest.raises(DatasetError) as err:
        read_images([bad, good], strict=True)
    assert str(bad) in str(err.value)


def test_runner_preprocess_imports_only_numpy_pillow_stdlib() -> None:
    """The runner's preprocessing ships in bundles: no torch, no pipeline."""
    import ast

    tree = ast.parse(Path(preprocess.__file__).read_text())
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert modules <= {"__future__", "logging", "dataclasses", "pathlib", "numpy", "PIL"}
