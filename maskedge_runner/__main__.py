"""Command line: run a bundle on images, print detections, write overlay PNGs.

    python -m maskedge_runner BUNDLE_DIR --image PATH [--image PATH ...] [--precision int8|fp32]
                              [--threads N] [--score 0.5] [--out DIR]

Reads ``BUNDLE_DIR/graph_spec.json``, ``BUNDLE_DIR/models/<precision>/*.onnx`` and, when
present, ``BUNDLE_DIR/manifest.json`` (class names from ``classes``: a list of
``{"label", "name", "category_id"}``; runtime options from ``runtime.options``). Writes
``<out>/<image stem>.overlay.png`` per image: coloured masks, boxes and labels of the detections
scoring at least ``--score``. Needs numpy, Pillow and the bundle's runtime (onnxruntime or
openvino, the manifest's ``runtime.name``) only. Exit status 1 with a
one-line message when the bundle or an image cannot be used.

numpy's BLAS runs single-threaded here (``OPENBLAS_NUM_THREADS=1`` unless set): the host code's
matrix products are small, and idle BLAS threads busy-wait, competing with the runtime's threads
for the cores.
"""

from __future__ import annotations

import os
import sys

if "numpy" not in sys.modules:  # the variables only take effect before numpy is imported
    for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from maskedge_runner.backends import THREAD_OPTION, RunnerError  # noqa: E402
from maskedge_runner.detections import Detections  # noqa: E402
from maskedge_runner.engine import Engine, read_manifest  # noqa: E402
from maskedge_runner.preprocess import ImageReadError, load_image  # noqa: E402

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
)
MASK_ALPHA = 0.45


def class_names(manifest: dict) -> dict[int, str]:
    """Label -> class name from a manifest's ``classes`` list (empty when absent)."""
    names = {}
    for entry in manifest.get("classes", []) or []:
        if isinstance(entry, dict) and "label" in entry and "name" in entry:
            names[int(entry["label"])] = str(entry["name"])
    return names


def draw_overlay(image: np.ndarray, det: Detections, names: dict[int, str]) -> Image.Image:
    """The image with each detection's mask blended in colour, its box and its label."""
    canvas = image.astype(np.float32)
    for i in range(len(det)):
        colour = np.asarray(PALETTE[int(det.labels[i]) % len(PALETTE)], dtype=np.float32)
        region = det.masks[i] > 0.5
        canvas[region] = canvas[region] * (1 - MASK_ALPHA) + colour * MASK_ALPHA
    out = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    for i in range(len(det)):
        label = int(det.labels[i])
        colour = PALETTE[label % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in det.boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = f"{names.get(label, str(label))} {float(det.scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + (right - left) + 4, ty + (bottom - top) + 2], fill=colour)
        draw.text((x0 + 2, ty), text, fill=(255, 255, 255))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maskedge_runner",
        description="Run a maskedge bundle on images: print detections, write overlay PNGs.",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder (has graph_spec.json, models/)")
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        required=True,
        help="an image file; repeat for several",
    )
    parser.add_argument(
        "--precision",
        default="int8",
        choices=("int8", "fp32"),
        help="which models of the bundle to run (default int8)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of the runtime (default: the manifest's)",
    )
    parser.add_argument(
        "--score",
        type=float,
        default=0.5,
        help="show detections scoring at least this (default 0.5)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="folder for the overlay PNGs (default: current folder)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        backend = read_manifest(args.bundle).get("runtime", {}).get("name") or "onnxruntime"
        if args.threads is not None and backend not in THREAD_OPTION:
            raise RunnerError(f"--threads is not mapped for backend {backend!r}")
        options = {} if args.threads is None else {THREAD_OPTION[backend]: args.threads}
        engine = Engine.from_dir(args.bundle, precision=args.precision, runtime_options=options)
        manifest = read_manifest(args.bundle)
        names = class_names(manifest)
        if manifest.get("status", "passed") != "passed":
            reasons = "; ".join(manifest.get("gate", {}).get("reasons", [])) or "see report.md"
            print(f"maskedge_runner: warning: this bundle failed its build gate ({reasons})",
                  file=sys.stderr)
        if args.out.exists() and not args.out.is_dir():
            raise RunnerError(f"--out {args.out}: is a file; give a folder for the overlay PNGs")
        written: set[Path] = set()
        for index, path in enumerate(args.image):
            image = load_image(path)
            args.out.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            det = engine.predict(image)
            elapsed = time.perf_counter() - started
            shown = np.flatnonzero(det.scores >= args.score)
            det = Detections(
                det.boxes[shown], det.scores[shown], det.labels[shown], det.masks[shown]
            )
            overlay = args.out / f"{path.stem}.overlay.png"
            if overlay in written:  # two inputs with one file name: keep both overlays
                overlay = args.out / f"{path.stem}.{index}.overlay.png"
            written.add(overlay)
            draw_overlay(image, det, names).save(overlay)
            print(
                f"{path}: {len(det)} detections with score >= {args.score:g} "
                f"({elapsed * 1e3:.1f} ms, {image.shape[1]}x{image.shape[0]}) -> {overlay}"
            )
            for i in range(len(det)):
                label = int(det.labels[i])
                x0, y0, x1, y1 = (float(v) for v in det.boxes[i])
                print(
                    f"  {names.get(label, str(label)):<16} {float(det.scores[i]):.3f}  "
                    f"box [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]  "
                    f"mask {int((det.masks[i] > 0.5).sum())} px"
                )
    except (RunnerError, ImageReadError) as err:
        print(f"maskedge_runner: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"maskedge_runner: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
