"""Export a torchvision Mask R-CNN as three static ONNX graphs plus the spec the host code needs.

Reads: a ``torchvision.models.detection.MaskRCNN`` object (any model :func:`pipeline.models.
build_model` builds; FPN backbone, ``MultiScaleRoIAlign`` poolers). Writes, under ``out_dir``::

    graph_spec.json                 input size, mean/std, FPN levels and strides, anchors, RPN and
                                    RoI-head settings, poolers, each graph's inputs/outputs,
                                    opset, exporter and library versions
    models/fp32/backbone.onnx       image [1,3,S,S] RGB in [0,1] -> feat_<level> (FPN maps),
                                    rpn_logits_<i> [1,A,H,W], rpn_deltas_<i> [1,4A,H,W]
    models/fp32/box_head.onnx       rois [N,C,7,7] -> class_logits [N,K], box_deltas [N,4K]
    models/fp32/mask_head.onnx      rois [N,C,14,14] -> mask_logits [N,K,28,28]

Normalisation (mean/std) is inside the backbone graph; letterboxing is the runner's
(``maskedge_runner.preprocess``). Everything between the graphs (anchors, proposals, NMS,
RoIAlign, box decoding, mask pasting) is ``maskedge_runner.postprocess``, configured from
``graph_spec.json``, whose every value is read off the model object.

Each file is written to a temporary name in the target folder, checked with ``onnx.checker``
and run once in ONNX Runtime against PyTorch, and only then renamed into place; a failure leaves
no partial file.

Known limits:

- The legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is the one used.
  The dynamo exporter fails on torchvision detection models and needs ``onnxscript``; asking for
  it (``exporter="dynamo"``) tries it and, if it fails, falls back to the legacy exporter with a
  warning, or stops with :class:`~pipeline.errors.ConversionError` when ``fallback=False``.
- The input size is fixed (``model.transform.min_size``); the model must not resize or pad a
  letterboxed SxS input, so S must be at most ``max_size`` and a multiple of ``size_divisible``.
- Only the inference path is exported (eval mode); batch size is 1 for the backbone and the
  number of RoIs N is the only dynamic axis.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops import MultiScaleRoIAlign

from pipeline.errors import ConversionError

log = logging.getLogger(__name__)

GRAPH_NAMES = ("backbone", "box_head", "mask_head")
SPEC_FORMAT = "maskedge-graph-spec"
SPEC_VERSION = 1
SPEC_FILE = "graph_spec.json"
# torchvision constants that are not attributes of the model (roi_heads.py, poolers.py)
ROI_HEADS_MIN_BOX_SIZE = 1e-2
LEVEL_MAPPER_EPS = 1e-6
MASK_PASTE_PADDING = 1
# largest max|torch - onnxruntime| accepted at export, relative to max(1, max|torch|)
VERIFY_RTOL = 1e-3

Exporter = Literal["legacy", "dynamo"]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_graphs` wrote."""

    out_dir: Path
    spec_path: Path
    graphs: dict[str, Path]  # graph name -> .onnx file
    graph_spec: dict[str, Any]
    exporter: str  # the exporter that produced the files
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # ORT vs torch at export

    @property
    def models_dir(self) -> Path:
        return self.out_dir / "models" / "fp32"


class BackboneGraph(nn.Module):
    """Normalisation, backbone + FPN and the RPN head, as one module with flat outputs."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        mean = torch.as_tensor(model.transform.image_mean, dtype=torch.float32)
        std = torch.as_tensor(model.transform.image_std, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("std", std.view(1, 3, 1, 1))
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (image - self.mean) / self.std
        features = list(self.backbone(x).values())
        logits, deltas = self.rpn_head(features)
        return (*features, *logits, *deltas)


class BoxHeadGraph(nn.Module):
    """Box head and predictor on pooled RoI features."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.head = model.roi_heads.box_head
        self.predictor = model.roi_heads.box_predictor

    def forward(self, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.head(rois))


class MaskHeadGraph(nn.Module):
    """Mask head and predictor on pooled RoI features."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.head = model.roi_heads.mask_head
        self.predictor = model.roi_heads.mask_predictor

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.head(rois))


@dataclass(frozen=True)
class _Graph:
    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # example inputs used for export
    check_inputs: dict[str, torch.Tensor]  # other inputs (another N) used to verify
    output_names: list[str]
    dynamic: bool  # first axis of inputs and outputs is N


def _input_size(model: MaskRCNN) -> int:
    transform = model.transform
    sizes = tuple(transform.min_size)
    if len(sizes) != 1:
        raise ConversionError(
            f"model.transform.min_size={sizes}: export needs one fixed input size; build the "
            "model with a single min_size"
        )
    size = int(sizes[0])
    if transform.max_size < size or size % transform.size_divisible:
        raise ConversionError(
            f"input size {size} with max_size={transform.max_size} and size_divisible="
            f"{transform.size_divisible}: a letterboxed {size}x{size} input would be resized or "
            "padded inside the model; use max_size >= size and a size that divides evenly"
        )
    if transform.fixed_size is not None:
        raise ConversionError(
            f"model.transform.fixed_size={transform.fixed_size}: not supported; use min_size"
        )
    return size


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, MaskRCNN):
        raise ConversionError(
            f"export_graphs takes a torchvision MaskRCNN, got {type(model).__name__}; load "
            "checkpoints with pipeline.checkpoint.load_checkpoint"
        )
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(model.roi_heads, name)
        if not isinstance(pool, MultiScaleRoIAlign):
            raise ConversionError(
                f"roi_heads.{name} is {type(pool).__name__}; the host code implements "
                "torchvision's MultiScaleRoIAlign only"
            )
    if model.roi_heads.keypoint_predictor is not None:
        raise ConversionError("keypoint heads are not exported; use a Mask R-CNN without them")


def _pooler_spec(
    pool: MultiScaleRoIAlign, feature_names: list[str], strides: list[int]
) -> dict[str, Any]:
    # torchvision pools the maps in the feature dict's order, keeping those named
    names = [n for n in feature_names if n in pool.featmap_names]
    missing = sorted(set(pool.featmap_names) - set(feature_names))
    if missing:
        raise ConversionError(
            f"RoI pooler reads feature maps {missing} that the backbone does not produce "
            f"({feature_names})"
        )
    pooled_strides = [strides[feature_names.index(n)] for n in names]
    scales = [2.0 ** round(math.log2(1.0 / s)) for s in pooled_strides]
    return {
        "featmap_names": names,
        "strides": pooled_strides,
        "scales": scales,
        "output_size": [int(v) for v in pool.output_size],
        "sampling_ratio": int(pool.sampling_ratio),
        "canonical_scale": int(pool.canonical_scale),
        "canonical_level": int(pool.canonical_level),
        "k_min": int(round(-math.log2(scales[0]))),
        "k_max": int(round(-math.log2(scales[-1]))),
        "level_mapper_eps": LEVEL_MAPPER_EPS,
        "aligned": False,
    }


def _io(names: list[str], tensors: list[torch.Tensor], dynamic: bool) -> list[dict[str, Any]]:
    rows = []
    for name, t in zip(names, tensors, strict=True):
        shape: list[int | str] = list(t.shape)
        if dynamic:
            shape[0] = "N"
        rows.append({"name": name, "shape": shape, "dtype": str(t.dtype).replace("torch.", "")})
    return rows


def _versions() -> dict[str, str]:
    import onnx
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
    }


def _plan(model: MaskRCNN, size: int) -> tuple[list[_Graph], dict[str, Any]]:
    """The three graphs with example inputs, and the graph spec read off ``model``."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=gen)
    backbone = BackboneGraph(model).eval()
    with torch.no_grad():
        features = model.backbone((image - backbone.mean) / backbone.std)
        logits, deltas = model.rpn.head(list(features.values()))
    feature_names = list(features.keys())
    grids = [tuple(int(v) for v in f.shape[-2:]) for f in features.values()]
    strides = [size // g[0] for g in grids]
    if any(size // g[1] != s for g, s in zip(grids, strides, strict=True)):
        raise ConversionError(f"feature grids {grids} at input {size} have unequal x/y strides")

    anchor_gen = model.rpn.anchor_generator
    if len(anchor_gen.sizes) != len(grids):
        raise ConversionError(
            f"the anchor generator has {len(anchor_gen.sizes)} levels but the backbone gives "
            f"{len(grids)} feature maps ({feature_names}); they must match"
        )
    cell_anchors = [
        anchor_gen.generate_anchors(list(s), list(a)).tolist()
        for s, a in zip(anchor_gen.sizes, anchor_gen.aspect_ratios, strict=True)
    ]
    channels = int(model.backbone.out_channels)
    num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
    heads = model.roi_heads
    box_pool = _pooler_spec(heads.box_roi_pool, feature_names, strides)
    mask_pool = _pooler_spec(heads.mask_roi_pool, feature_names, strides)

    feat_out = [f"feat_{n}" for n in feature_names]
    logit_out = [f"rpn_logits_{i}" for i in range(len(grids))]
    delta_out = [f"rpn_deltas_{i}" for i in range(len(grids))]
    box_rois = torch.randn(3, channels, *box_pool["output_size"], generator=gen)
    box_check = torch.randn(7, channels, *box_pool["output_size"], generator=gen)
    mask_rois = torch.randn(2, channels, *mask_pool["output_size"], generator=gen)
    mask_check = torch.randn(5, channels, *mask_pool["output_size"], generator=gen)
    graphs = [
        _Graph(
            "backbone",
            backbone,
            {"image": image},
            {"image": torch.rand(1, 3, size, size, generator=gen)},
            feat_out + logit_out + delta_out,
            dynamic=False,
        ),
        _Graph(
            "box_head",
            BoxHeadGraph(model).eval(),
            {"rois": box_rois},
            {"rois": box_check},
            ["class_logits", "box_deltas"],
            dynamic=True,
        ),
        _Graph(
            "mask_head",
            MaskHeadGraph(model).eval(),
            {"rois": mask_rois},
            {"rois": mask_check},
            ["mask_logits"],
            dynamic=True,
        ),
    ]
    with torch.no_grad():
        box_out = graphs[1].module(box_rois)
        mask_out = graphs[2].module(mask_rois)
    rpn = model.rpn
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "input": {
            "name": "image",
            "size": size,
            "layout": "NCHW",
            "channels": "RGB",
            "range": [0.0, 1.0],
            "mean": [float(v) for v in model.transform.image_mean],
            "std": [float(v) for v in model.transform.image_std],
            "letterbox": "aspect kept, longer side = size, padded bottom/right with the mean",
            "normalization": "inside the backbone graph",
        },
        "num_classes": num_classes,
        "fpn": {
            "levels": feature_names,
            "strides": strides,
            "grids": [list(g) for g in grids],
            "channels": channels,
        },
        "anchors": {
            "sizes": [list(s) for s in anchor_gen.sizes],
            "aspect_ratios": [list(a) for a in anchor_gen.aspect_ratios],
            "cell_anchors": cell_anchors,
            "per_location": anchor_gen.num_anchors_per_location(),
        },
        "rpn": {
            "pre_nms_top_n": int(rpn._pre_nms_top_n["testing"]),
            "post_nms_top_n": int(rpn._post_nms_top_n["testing"]),
            "nms_thresh": float(rpn.nms_thresh),
            "score_thresh": float(rpn.score_thresh),
            "min_size": float(rpn.min_size),
            "box_coder_weights": [float(w) for w in rpn.box_coder.weights],
            "bbox_xform_clip": float(rpn.box_coder.bbox_xform_clip),
        },
        "box_roi_pool": box_pool,
        "mask_roi_pool": mask_pool,
        "roi_heads": {
            "box_coder_weights": [float(w) for w in heads.box_coder.weights],
            "bbox_xform_clip": float(heads.box_coder.bbox_xform_clip),
            "score_thresh": float(heads.score_thresh),
            "nms_thresh": float(heads.nms_thresh),
            "detections_per_img": int(heads.detections_per_img),
            "min_box_size": ROI_HEADS_MIN_BOX_SIZE,
        },
        "mask": {"resolution": int(mask_out.shape[-1]), "paste_padding": MASK_PASTE_PADDING},
        "graphs": {
            "backbone": {
                "file": "backbone.onnx",
                "inputs": _io(["image"], [image], False),
                "outputs": _io(
                    graphs[0].output_names, [*features.values(), *logits, *deltas], False
                ),
            },
            "box_head": {
                "file": "box_head.onnx",
                "inputs": _io(["rois"], [box_rois], True),
                "outputs": _io(graphs[1].output_names, list(box_out), True),
            },
            "mask_head": {
                "file": "mask_head.onnx",
                "inputs": _io(["rois"], [mask_rois], True),
                "outputs": _io(graphs[2].output_names, [mask_out], True),
            },
        },
    }
    arch = getattr(model, "arch_spec", None)
    if arch is not None:
        spec["arch"] = arch.to_dict()
    return graphs, spec


def _export_one(graph: _Graph, path: Path, opset: int, dynamo: bool) -> None:
    """Export ``graph`` to ``path`` (which must not be the final name) and check it."""
    import onnx

    input_names = list(graph.inputs)
    args = tuple(graph.inputs.values())
    if dynamo:
        dim = torch.export.Dim("N", min=1, max=4096)
        dynamic_shapes = {name: {0: dim} for name in input_names} if graph.dynamic else None
        torch.onnx.export(
            graph.module,
            args,
            str(path),
            input_names=input_names,
            output_names=graph.output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
        )
    else:
        axes = None
        if graph.dynamic:
            axes = {name: {0: "N"} for name in input_names + graph.output_names}
        with warnings.catch_warnings():
            # the legacy exporter is chosen on purpose (see the module docstring)
            warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
            torch.onnx.export(
                graph.module,
                args,
                str(path),
                input_names=input_names,
                output_names=graph.output_names,
                opset_version=opset,
                dynamo=False,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    outputs = [o.name for o in proto.graph.output]
    if outputs != graph.output_names:
        raise ValueError(f"graph outputs are {outputs}, expected {graph.output_names}")


def _verify(graph: _Graph, path: Path) -> float:
    """Max |onnxruntime - torch| over all outputs, on the check inputs (another N)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in graph.check_inputs.items()}
    got = session.run(graph.output_names, feeds)
    with torch.no_grad():
        ref = graph.module(*graph.check_inputs.values())
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    worst = 0.0
    for name, g, r in zip(graph.output_names, got, ref, strict=True):
        r = r.numpy()
        if g.shape != r.shape:
            raise ConversionError(
                f"{graph.name} graph: output {name} has shape {g.shape} in onnxruntime but "
                f"{r.shape} in torch; the export is wrong, report it with the model's ArchSpec"
            )
        diff = float(np.abs(g - r).max()) if r.size else 0.0
        if diff > VERIFY_RTOL * max(1.0, float(np.abs(r).max()) if r.size else 0.0):
            raise ConversionError(
                f"{graph.name} graph: output {name} differs from torch by {diff:.3g} (max |torch| "
                f"{float(np.abs(r).max()):.3g}); the exported graph does not reproduce the model"
            )
        worst = max(worst, diff)
    return worst


def _export_to_temp(
    graph: _Graph, target: Path, opset: int, exporter: Exporter, fallback: bool
) -> tuple[Path, str]:
    """Export one graph to a temporary file beside ``target``; returns it and the exporter used.

    On failure the temporary file is removed and :class:`ConversionError` names the exporter.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    attempts: list[Exporter] = ["legacy"]
    if exporter == "dynamo":
        attempts = ["dynamo", "legacy"] if fallback else ["dynamo"]
    last_error: Exception | None = None
    for attempt in attempts:
        try:
            _export_one(graph, tmp, opset, dynamo=attempt == "dynamo")
            return tmp, attempt
        except Exception as err:  # the exporters raise many unrelated types
            tmp.unlink(missing_ok=True)
            last_error = err
            if attempt == "dynamo" and len(attempts) > 1:
                log.warning(
                    "the dynamo exporter failed on the %s graph (%s: %s); falling back "
                    "to the legacy TorchScript exporter",
                    graph.name,
                    type(err).__name__,
                    _first_line(err),
                )
    assert last_error is not None
    what = attempts[-1]
    hint = (
        "use exporter='legacy' (the default), which exports torchvision detection models"
        if what == "dynamo"
        else "check that the model is a torchvision MaskRCNN"
    )
    raise ConversionError(
        f"the {what} exporter failed on the {graph.name} graph ({type(last_error).__name__}: "
        f"{_first_line(last_error)}); nothing was written to {target.parent}; {hint}"
    ) from last_error


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_graphs(
    model: MaskRCNN,
    out_dir: Path,
    *,
    opset: int = 17,
    exporter: Exporter = "legacy",
    fallback: bool = True,
    verify: bool = True,
) -> ExportResult:
    """Export ``model`` as the three static graphs and write ``graph_spec.json`` (see module doc).

    ``exporter='dynamo'`` tries torch's dynamo exporter first; on failure it falls back to the
    legacy one (``fallback=True``) or raises :class:`ConversionError`. With ``verify`` each graph
    is run in ONNX Runtime at a different N than it was exported with and compared with torch.
    Existing files of the same names are replaced; nothing is left half-written.
    """
    _check_model(model)
    if exporter not in ("legacy", "dynamo"):
        raise ConversionError(f"exporter={exporter!r}: use 'legacy' or 'dynamo'")
    if not 11 <= opset <= 20:
        raise ConversionError(f"opset={opset}: the legacy exporter supports opsets 11 to 20")
    out_dir = Path(out_dir)
    models_dir = out_dir / "models" / "fp32"
    started = time.perf_counter()

    was_training = model.training
    model.eval()
    temps: dict[str, Path] = {}
    try:
        size = _input_size(model)
        graphs, spec = _plan(model, size)
        models_dir.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        diffs: dict[str, float] = {}
        # all three graphs to temporary files first, so a failure replaces nothing
        for graph in graphs:
            temps[graph.name], how = _export_to_temp(
                graph, models_dir / f"{graph.name}.onnx", opset, exporter, fallback
            )
            used.add(how)
            if verify:
                diffs[graph.name] = _verify(graph, temps[graph.name])
        paths = {name: models_dir / f"{name}.onnx" for name in temps}
        for name, tmp in temps.items():
            os.replace(tmp, paths[name])
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        model.train(was_training)

    spec["opset"] = opset
    spec["exporter"] = "legacy" if "legacy" in used else "dynamo"
    spec["versions"] = _versions()
    if diffs:
        spec["export_check"] = {"max_abs_diff": diffs, "runtime": "onnxruntime"}
    spec = json.loads(json.dumps(spec))  # plain JSON types, as a reader of the file gets them
    spec_path = out_dir / SPEC_FILE
    _write_json_atomic(spec_path, spec)
    log.info(
        "exported %s to %s (opset %d, %s exporter, input %d px, max |ort - torch| %s) in %.1f s",
        ", ".join(paths),
        models_dir,
        opset,
        spec["exporter"],
        size,
        f"{max(diffs.values()):.2g}" if diffs else "not checked",
        time.perf_counter() - started,
    )
    return ExportResult(
        out_dir=out_dir,
        spec_path=spec_path,
        graphs=paths,
        graph_spec=spec,
        exporter=spec["exporter"],
        max_abs_diff=diffs,
    )


def load_graph_spec(folder: Path) -> dict[str, Any]:
    """Read ``<folder>/graph_spec.json`` written by :func:`export_graphs`."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: graph spec not found; run the export stage first")
    spec = json.loads(path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ConversionError(f"{path}: not a maskedge graph spec (format={spec.get('format')!r})")
    return spec
