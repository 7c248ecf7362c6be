"""The one inference path: letterbox, three static graphs, numpy host code, map back.

Used for parity on the host and for inference on the device alike. A bundle folder holds::

    graph_spec.json                  written by the export stage (pipeline/export.py)
    models/<precision>/backbone.onnx image [1,3,S,S] -> FPN maps and RPN head outputs
    models/<precision>/box_head.onnx rois [N,C,7,7] -> class_logits, box_deltas
    models/<precision>/mask_head.onnx rois [N,C,14,14] -> mask_logits
    models/<precision>/<graph>.xml/.bin  the same graphs as OpenVINO IR (openvino bundles)
    manifest.json                    optional; ["runtime"]["options"] are the default options

One call handles one image: a batch is a list of images run one after another
(:meth:`Engine.predict_many`); nothing is carried from one call to the next except the anchors,
which depend only on the input size. An image without detections skips the mask graph and gives
empty results of the right shapes (boxes 0x4, masks 0xHxW).

Stages timed in :attr:`Engine.last_timings` (seconds, the last call): ``preprocess``,
``backbone``, ``rpn_post``, ``roi_align_box``, ``box_head``, ``box_post``, ``roi_align_mask``,
``mask_head``, ``mask_paste``; a stage that did not run reads 0.0.

Threads: the host code runs in the calling thread between the graphs. ONNX Runtime's pool
threads busy-wait after each run by default (and numpy's BLAS threads after each matrix
product); on a device whose cores all run the runtime they take cores from the host code and
from each other. The runtime option ``allow_spinning: false`` avoids that (measured on a loaded
2-core host, interleaved runs in one process: 2-3x faster end to end); ``OPENBLAS_NUM_THREADS=1``
keeps numpy's BLAS out of the way (the command line sets it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maskedge_runner import postprocess as pp
from maskedge_runner.backends import GraphFn, RunnerError, make_backend, model_file
from maskedge_runner.detections import Detections
from maskedge_runner.preprocess import boxes_to_original, letterbox

log = logging.getLogger(__name__)

GRAPHS = ("backbone", "box_head", "mask_head")
STAGES = (
    "preprocess",
    "backbone",
    "rpn_post",
    "roi_align_box",
    "box_head",
    "box_post",
    "roi_align_mask",
    "mask_head",
    "mask_paste",
)
GRAPH_STAGES = ("backbone", "box_head", "mask_head")
SPEC_FORMAT = "maskedge-graph-spec"

Capture = Callable[[str, dict[str, np.ndarray]], None]


class Engine:
    """Mask R-CNN inference over three static graphs, configured by ``graph_spec``."""

    def __init__(self, graph_spec: dict, graphs: dict[str, GraphFn]) -> None:
        if graph_spec.get("format") != SPEC_FORMAT:
            raise RunnerError(
                f"graph spec format {graph_spec.get('format')!r}, expected {SPEC_FORMAT!r}; "
                "pass the graph_spec.json written by the export stage"
            )
        missing = [g for g in GRAPHS if g not in graphs]
        if missing:
            raise RunnerError(f"graphs {missing} missing; an Engine needs {', '.join(GRAPHS)}")
        self.spec = graph_spec
        self.graphs = dict(graphs)
        self.size = int(graph_spec["input"]["size"])
        self.num_classes = int(graph_spec["num_classes"])
        self.mask_resolution = int(graph_spec["mask"]["resolution"])
        self.paste_padding = int(graph_spec["mask"]["paste_padding"])
        fpn = graph_spec["fpn"]
        self.anchors = [
            pp.grid_anchors(
                np.asarray(cells, dtype=np.float32),
                (int(g[0]), int(g[1])),
                (self.size // int(g[0]), self.size // int(g[1])),
            )
            for cells, g in zip(graph_spec["anchors"]["cell_anchors"], fpn["grids"], strict=True)
        ]
        self.capture: Capture | None = None
        self.precision: str | None = None  # set by from_dir
        self.folder: Path | None = None
        self.last_timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @classmethod
    def from_dir(
        cls,
        folder: Path | str,
        precision: str = "int8",
        backend: str | None = None,
        runtime_options: Mapping[str, Any] | None = None,
    ) -> Engine:
        """An engine on ``folder``'s ``models/<precision>`` graphs.

        ``backend`` defaults to the bundle manifest's ``["runtime"]["name"]``, else
        ``onnxruntime``; each backend loads its own file format of a graph
        (:func:`maskedge_runner.backends.model_file`). Runtime options default to the manifest's
        ``["runtime"]["options"]`` when the manifest's runtime is that backend;
        ``runtime_options`` override them key by key.
        """
        folder = Path(folder)
        spec_path = folder / "graph_spec.json"
        if not spec_path.is_file():
            raise RunnerError(f"{spec_path}: not found; {folder} is not a maskedge bundle")
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunnerError(f"{spec_path}: cannot read ({err}); re-export the bundle") from err
        models = folder / "models" / precision
        if not models.is_dir():
            have = sorted(p.name for p in (folder / "models").glob("*") if p.is_dir())
            raise RunnerError(
                f"{models}: no {precision} models in this bundle (it has: "
                f"{', '.join(have) or 'none'}); pick one of those precisions"
            )
        runtime = read_manifest(folder).get("runtime", {})
        backend = backend or runtime.get("name") or "onnxruntime"
        options = {}
        if runtime.get("name", backend) == backend:
            options.update(runtime.get("options", {}))
        options.update(runtime_options or {})
        graphs = {
            name: make_backend(backend, model_file(backend, models, spec["graphs"][name]["file"]),
                               options)
            for name in GRAPHS
        }
        engine = cls(spec, graphs)
        engine.precision = precision
        engine.folder = folder
        log.info(
            "loaded %s %s graphs from %s (%s, options %s)",
            precision,
            len(graphs),
            models,
            backend,
            options or "default",
        )
        return engine

    # -----------------------------------------------------------------------------------------

    def _run_graph(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.capture is not None:
            self.capture(name, inputs)
        started = time.perf_counter()
        outputs = self.graphs[name](inputs)
        self.last_timings[name] = time.perf_counter() - started
        return outputs

    def _empty_result(self) -> dict[str, np.ndarray]:
        m = self.mask_resolution
        return {
            "boxes": np.zeros((0, 4), np.float32),
            "scores": np.zeros((0,), np.float32),
            "labels": np.zeros((0,), np.int64),
            "masks": np.zeros((0, m, m), np.float32),
        }

    def _pool(self, key: str, outputs: dict[str, np.ndarray], boxes: np.ndarray) -> np.ndarray:
        pool = self.spec[key]
        return pp.multiscale_roi_align(
            [outputs[f"feat_{name}"] for name in pool["featmap_names"]],
            boxes,
            pool["output_size"],
            pool["sampling_ratio"],
            pool["scales"],
            pool["canonical_scale"],
            pool["canonical_level"],
        )

    def predict_letterboxed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Results in the model frame for one letterboxed input (1,3,S,S) float32 in [0, 1].

        Returns boxes (N,4) float32 xyxy, scores (N,) float32, labels (N,) int64 and masks
        (N,M,M) float32 probabilities (M = 28), best first.
        """
        x = np.asarray(x)
        s = self.size
        if x.shape != (1, 3, s, s) or x.dtype != np.float32:
            raise RunnerError(
                f"input of shape {x.shape} and dtype {x.dtype}: expected (1, 3, {s}, {s}) "
                "float32 from maskedge_runner.preprocess.letterbox"
            )
        self.last_timings = dict.fromkeys(STAGES, 0.0)
        clock = time.perf_counter

        out = self._run_graph("backbone", {"image": x})
        started = clock()
        rpn = self.spec["rpn"]
        levels = range(len(self.anchors))
        proposals, _ = pp.rpn_proposals(
            [out[f"rpn_logits_{i}"] for i in levels],
            [out[f"rpn_deltas_{i}"] for i in levels],
            self.anchors,
            (s, s),
            pre_nms_top_n=rpn["pre_nms_top_n"],
            post_nms_top_n=rpn["post_nms_top_n"],
            nms_thresh=rpn["nms_thresh"],
            score_thresh=rpn["score_thresh"],
            min_size=rpn["min_size"],
            weights=rpn["box_coder_weights"],
            clip=rpn["bbox_xform_clip"],
        )
        self.last_timings["rpn_post"] = clock() - started
        if proposals.shape[0] == 0:
            return self._empty_result()

        started = clock()
        rois = self._pool("box_roi_pool", out, proposals)
        self.last_timings["roi_align_box"] = clock() - started
        head = self._run_graph("box_head", {"rois": rois})
        started = clock()
        heads = self.spec["roi_heads"]
        boxes, scores, labels = pp.box_detections(
            head["class_logits"],
            head["box_deltas"],
            proposals,
            (s, s),
            score_thresh=heads["score_thresh"],
            nms_thresh=heads["nms_thresh"],
            detections_per_img=heads["detections_per_img"],
            weights=heads["box_coder_weights"],
            clip=heads["bbox_xform_clip"],
            min_size=heads["min_box_size"],
        )
        self.last_timings["box_post"] = clock() - started
        if boxes.shape[0] == 0:
            return self._empty_result()

        started = clock()
        rois = self._pool("mask_roi_pool", out, boxes)
        self.last_timings["roi_align_mask"] = clock() - started
        logits = self._run_graph("mask_head", {"rois": rois})["mask_logits"]
        masks = pp.select_masks(logits, labels)
        return {
            "boxes": boxes.astype(np.float32),
            "scores": scores.astype(np.float32),
            "labels": labels.astype(np.int64),
            "masks": masks.astype(np.float32),
        }

    def predict(self, image: np.ndarray) -> Detections:
        """Detections of one HxWx3 uint8 RGB image, in its own coordinates."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise RunnerError(
                f"image of shape {image.shape} and dtype {image.dtype}: expected HxWx3 uint8 "
                "RGB (maskedge_runner.preprocess.load_image reads any file into it)"
            )
        started = time.perf_counter()
        x, box = letterbox(image, self.size)
        preprocess = time.perf_counter() - started
        result = self.predict_letterboxed(x)
        self.last_timings["preprocess"] = preprocess

        started = time.perf_counter()
        if result["boxes"].shape[0] == 0:
            detections = Detections.empty(box.orig_h, box.orig_w)
        else:
            masks = pp.paste_masks(
                result["masks"],
                result["boxes"] / box.scale,
                box.orig_h,
                box.orig_w,
                padding=self.paste_padding,
            )
            detections = Detections(
                boxes_to_original(result["boxes"], box), result["scores"], result["labels"], masks
            )
        self.last_timings["mask_paste"] = time.perf_counter() - started
        return detections

    __call__ = predict

    def predict_many(self, images: Iterable[np.ndarray]) -> list[Detections]:
        """One :class:`Detections` per image, in order; images run one at a time."""
        return [self.predict(image) for image in images]


def read_manifest(folder: Path | str) -> dict[str, Any]:
    """``folder/manifest.json`` as a dict, or {} when the folder has none."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunnerError(f"{path}: cannot read ({err}); the bundle is damaged") from err
