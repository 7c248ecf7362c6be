"""The one module that knows the order of the stages of ``invoke build``.

    load teacher -> distill student -> export static graphs -> calibrate -> quantize
    -> validate parity (through the bundle's own runner) -> profile latency (own process)
    -> gate -> bundle

Reads: the teacher checkpoint (default ``demo/teacher.pt``), a training set for distillation
(COCO or an unlabelled image folder; default the demo train split), a calibration image set
(default the demo calib split) and a COCO validation set (default the demo val split).
Writes: ``artifacts/cache/<stage>-<key>/`` for every finished stage (a rerun or another target
reuses them and says so) and the bundle ``artifacts/<target>/`` (see :mod:`pipeline.bundle`).

A teacher whose classes are not the demo's (other ids or names) distils on the demo train images
with its own pseudo-labels and, without ``--val-coco``, is validated against its own detections
scoring >= 0.5 on the demo val images (cached as ``pseudo-val-<key>/``): AP then measures
agreement with the teacher, not accuracy, and the report's data sources say so. A
``--train-coco``/``--val-coco`` file must share category ids with the teacher, under the same
names when the teacher names its classes. Unreadable images are skipped and counted in the
report's data section; with ``strict`` the build stops at the first, before distillation.

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
from pipeline.errors import ConfigError, DatasetError, GateError

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
    arch: str | None = None
    num_classes: int | None = None
    class_names: str | None = None
    trust_checkpoint: bool = False
    student: str = "mobilenet_v3_large"
    image_size: int = 256
    distill_steps: int | None = None
    baseline: bool = True
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
        if self.val_limit is not None and self.val_limit < 1:
            raise ConfigError(f"--val-limit={self.val_limit} must be >= 1 (or left out: all)")
        if self.distill_steps is not None and self.distill_steps < 1:
            raise ConfigError(f"--distill-steps={self.distill_steps} must be >= 1")
        if self.image_size < 64 or self.image_size % 64:
            raise ConfigError(f"--image-size={self.image_size} must be a multiple of 64")
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            raise ConfigError(f"{self.checkpoint}: checkpoint file not found")

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


@dataclass
class _Data:
    """The image sets of one build, with the hashes their cache keys use."""

    train: Any  # CocoInstances, or a list of image paths (unlabelled)
    train_hash: str
    calib_paths: list[Path]
    val: Any  # CocoInstances
    val_hash: str
    sources: dict[str, str]
    quality: dict[str, Any]


def _demo_has_teacher_classes(annotation_file: Path, loaded) -> bool:
    """Whether the demo split's categories are the teacher's own (same ids, names, order)."""
    from pipeline.datasets import read_categories

    cats = read_categories(annotation_file)
    return cats == list(zip(loaded.category_ids, loaded.class_names))


def _pseudo_labelled_val(config: BuildConfig, loaded, teacher_hash: str,
                         demo_val) -> tuple[Any, str]:
    """The demo val images labelled by the teacher's detections (cached): the reference when no
    labelled set has the teacher's classes. AP against it measures agreement with the teacher."""
    from pipeline.datasets import CocoInstances, write_pseudo_labelled_coco
    from pipeline.evaluate import TorchPredictor

    cache = StageCache(config.artifacts / "cache")
    key_parts = {"teacher": teacher_hash, "val": sha256_file(demo_val.annotation_file),
                 "limit": config.val_limit, "threshold": 0.5, "version": __version__}
    key = hash_json(key_parts)
    if cache.lookup("pseudo-val", key) is None:
        with cache.build("pseudo-val", key, key_parts) as tmp:
            write_pseudo_labelled_coco(TorchPredictor(loaded.model), demo_val,
                                       list(zip(loaded.category_ids, loaded.class_names)),
                                       tmp / "annotations.json", limit=config.val_limit)
    ann = cache.lookup("pseudo-val", key) / "annotations.json"
    val = CocoInstances(ann, demo_val.image_dir, category_ids=loaded.category_ids)
    if not val.coco.getAnnIds(imgIds=val.image_ids):
        raise DatasetError(
            f"the teacher ({loaded.path}) detects nothing scoring >= 0.5 on the {len(val)} demo "
            "val images, so there is no reference to validate against; give --val-coco and "
            "--val-images with annotated images of the teacher's classes")
    return val, sha256_file(ann)


def _check_coco_categories(annotation_file: Path, loaded, role: str) -> None:
    """Refuse a --train-coco/--val-coco file whose categories are not the teacher's labels.

    Annotations are matched to the teacher's labels by category id; a file sharing no id with
    the teacher, or giving a shared id another class name than the teacher's own (named) class,
    would train or score against the wrong classes without any error further on.
    """
    from pipeline.datasets import read_categories

    file_cats = dict(read_categories(annotation_file))
    teacher_cats = dict(zip(loaded.category_ids, loaded.class_names))
    teacher = (f"the teacher's {list(teacher_cats)} "
               f"({', '.join(list(teacher_cats.values())[:10])})")
    fix = (f"give the annotations of the teacher's classes, or pass "
           f"--class-names={annotation_file} if the teacher's labels follow this file's categories")
    if role == "train":
        fix += (", or drop --train-coco to distill on --train-images with teacher pseudo-labels "
                "only")
    shared = sorted(set(file_cats) & set(teacher_cats))
    if not shared:
        raise DatasetError(
            f"{annotation_file}: none of its category ids {list(file_cats)[:10]} is one of "
            f"{teacher}, so it has no {role} ground truth for this teacher; {fix}")
    if loaded.metadata.get("loaded_as", {}).get("class_names_from") == "default":
        return  # the teacher's names are placeholders: ids are all there is to compare
    differ = [c for c in shared
              if file_cats[c].strip().casefold() != teacher_cats[c].strip().casefold()]
    if differ:
        pairs = ", ".join(f"{c}: {file_cats[c]!r} here, {teacher_cats[c]!r} for the teacher"
                          for c in differ[:5])
        raise DatasetError(
            f"{annotation_file}: category ids name other classes than the teacher's ({pairs}), "
            f"so its {role} labels would stand for the wrong classes; {fix}")


def _resolve_data(config: BuildConfig, loaded, teacher_hash: str) -> _Data:
    from pipeline.datasets import CocoInstances, DataQuality, list_images, usable_images
    from pipeline.demo import DemoSpec, ensure_demo_data

    category_ids = list(loaded.category_ids)

    needs_demo = (config.train_images is None or config.calib_images is None
                  or config.val_coco is None)
    splits = {}
    if needs_demo:
        splits = ensure_demo_data(config.artifacts / "demo_data", DemoSpec(**config.demo_spec))
    sources = {}
    if config.train_coco is not None:
        _check_coco_categories(config.train_coco, loaded, "train")
        train: Any = CocoInstances(config.train_coco, config.train_images,
                                   category_ids=category_ids, strict=config.strict)
        train.check_images()
        train_hash = sha256_files([config.train_coco]) + str(len(train))
        sources["train"] = f"COCO {config.train_coco}"
    elif config.train_images is not None:
        train_quality = DataQuality(source=str(config.train_images))
        train = usable_images(list_images(config.train_images), strict=config.strict,
                              quality=train_quality)
        train_hash = hash_json([(str(p.relative_to(config.train_images)), p.stat().st_size)
                                for p in train])
        sources["train"] = f"unlabelled images {config.train_images} ({len(train)})"
    elif _demo_has_teacher_classes(splits["train"] / "annotations.json", loaded):
        ann = splits["train"] / "annotations.json"
        train = CocoInstances(ann, splits["train"] / "images")
        train_hash = sha256_file(ann)
        sources["train"] = f"demo train split {splits['train']}"
    else:
        train = list_images(splits["train"] / "images")
        train_hash = sha256_file(splits["train"] / "annotations.json") + "-unlabelled"
        log.warning(
            "the teacher's classes (%s) are not the demo set's: distilling on the %d demo train "
            "images with teacher pseudo-labels only; give --train-images (and --train-coco) "
            "with the teacher's own data for a student meant for deployment",
            ", ".join(loaded.class_names[:10]), len(train))
        sources["train"] = (f"demo train split {splits['train']} images, unlabelled (teacher "
                            "pseudo-labels only: the teacher's classes are not the demo's)")
    calib_dir = config.calib_images or splits["calib"] / "images"
    calib_paths = list_images(calib_dir)
    if config.strict:  # fail now, not after distillation; otherwise calibration skips and counts
        usable_images(calib_paths, strict=True)
    elif not _any_readable(calib_paths):  # a folder of nothing but broken files: say so now too
        raise DatasetError(
            f"{calib_dir}: none of the {len(calib_paths)} candidate calibration images could be "
            "read; point --calib-images at a folder of readable images"
        )
    sources["calibration"] = ("demo calib split " if config.calib_images is None else "") + str(
        calib_dir)
    if config.val_coco is not None:
        _check_coco_categories(config.val_coco, loaded, "val")
        val = CocoInstances(config.val_coco, config.val_images, category_ids=category_ids,
                            strict=config.strict)
        val.check_images()
        val_hash = sha256_file(config.val_coco)
        sources["validation"] = f"COCO {config.val_coco}"
    elif _demo_has_teacher_classes(splits["val"] / "annotations.json", loaded):
        ann = splits["val"] / "annotations.json"
        val = CocoInstances(ann, splits["val"] / "images")
        val_hash = sha256_file(ann)
        sources["validation"] = f"demo val split {splits['val']}"
    else:
        demo_val = CocoInstances(splits["val"] / "annotations.json", splits["val"] / "images")
        val, val_hash = _pseudo_labelled_val(config, loaded, teacher_hash, demo_val)
        log.warning(
            "the teacher's classes are not the demo set's: validating on %d demo val images "
            "labelled by the teacher's own detections (AP measures agreement with the teacher, "
            "not accuracy); give --val-coco and --val-images for real figures", len(val))
        sources["validation"] = (f"demo val split {splits['val']} images labelled by the "
                                 "teacher's detections (score >= 0.5): AP is agreement with the "
                                 "teacher, not accuracy")
    if not val.coco.getAnnIds(imgIds=val.image_ids):
        raise DatasetError(
            f"{val.annotation_file}: no usable annotations for validation (categories in the "
            f"file: {sorted(val.coco.cats)}; the teacher's category ids: {category_ids}; "
            f"dropped: {val.quality.to_dict().get('annotations_dropped')}); AP measured on "
            "nothing would gate nothing. Give a COCO file whose category ids match the "
            "checkpoint's (see --class-names)")
    quality = {"validation": val.quality.to_dict()}
    if hasattr(train, "quality"):
        quality["train"] = train.quality.to_dict()
    elif config.train_images is not None:
        quality["train"] = train_quality.to_dict()
    return _Data(train, train_hash, calib_paths, val, val_hash, sources, quality)


def _evaluate(stages: _Stages, name: str, key_parts: dict[str, Any], predict, val,
              limit: int | None) -> dict[str, float]:
    """COCO AP of ``predict``, cached when ``key_parts`` identify a fixed model."""
    from pipeline.evaluate import evaluate_coco

    key = hash_json({**key_parts, "limit": limit, "version": __version__})
    entry = stages.cache.lookup(f"eval-{name}", key)
    if entry is not None:
        return json.loads((entry / "metrics.json").read_text())
    with stages.cache.build(f"eval-{name}", key, key_parts) as tmp:
        metrics = evaluate_coco(predict, val, limit=limit)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _distill_settings(config: BuildConfig):
    from pipeline.distill import DistillSettings

    return DistillSettings(**({"steps": config.distill_steps} if config.distill_steps else {}))


def _train_student(stages: _Stages, stage: str, settings, config: BuildConfig, loaded,
                   teacher_hash: str, data: _Data):
    """Train (or reuse from the cache) one student with ``settings``: the distilled student, or
    the ground-truth-only baseline. Returns the loaded student, its report and its file hash."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.distill import distill
    from pipeline.models import student_spec
    from pipeline.train import save_checkpoint

    t0 = stages.begin(stage)
    spec = student_spec(loaded.num_classes, backbone=config.student,
                        image_size=config.image_size)
    key_parts = {"teacher": teacher_hash, "student": spec.to_dict(),
                 "settings": settings.cache_key(), "train": data.train_hash, "version": __version__}
    if not settings.uses_teacher:  # the baseline does not depend on the teacher's weights
        key_parts["teacher"] = None
    key = hash_json(key_parts)
    entry = stages.cache.lookup(stage, key)
    cached = entry is not None
    if entry is None:
        workdir = stages.cache.root / f"work-{stage}-{key[:16]}"
        with stages.cache.build(stage, key, key_parts) as tmp:
            student, report = distill(loaded.model, spec, train=data.train, settings=settings,
                                      workdir=workdir)
            save_checkpoint(student, spec, loaded.class_names, loaded.category_ids,
                            tmp / "student.pt", fp16=False)
            (tmp / "distill.json").write_text(json.dumps(report, indent=2, default=str))
        shutil.rmtree(workdir, ignore_errors=True)
        entry = stages.cache.lookup(stage, key)
    report = json.loads((entry / "distill.json").read_text())
    student = load_checkpoint(entry / "student.pt")
    stages.end(stage, t0, cached, entry / "student.pt",
               f"{spec.backbone} student, {report.get('steps', '?')} steps")
    return student, report, sha256_file(entry / "student.pt")


def _stage_distill(stages: _Stages, config: BuildConfig, loaded, teacher_hash: str,
                   data: _Data):
    return _train_student(stages, "distill", _distill_settings(config), config, loaded,
                          teacher_hash, data)


def _stage_baseline(stages: _Stages, config: BuildConfig, loaded, teacher_hash: str,
                    data: _Data) -> dict[str, Any]:
    """The ground-truth-only student with the distilled student's budget, evaluated on val.

    Only with a labelled training set (an unlabelled folder has no ground truth to train on) and
    ``config.baseline``; otherwise the returned record says why there is none.
    """
    from pipeline.distill import baseline_settings
    from pipeline.evaluate import TorchPredictor
    from pipeline.models import count_macs, count_parameters

    if not config.baseline:
        return {"skipped": "--no-baseline"}
    if not hasattr(data.train, "quality"):
        return {"skipped": "the training set is unlabelled: no ground truth to train a "
                           "baseline on"}
    settings = baseline_settings(_distill_settings(config))
    student, report, student_hash = _train_student(stages, "baseline", settings, config, loaded,
                                                   None, data)
    metrics = _evaluate(stages, "baseline", {"model": student_hash, "val": data.val_hash},
                        TorchPredictor(student.model), data.val, config.val_limit)
    return {"metrics": metrics, "sha256": student_hash, "steps": report.get("steps"),
            "seconds": report.get("seconds"), "settings": report.get("settings"),
            "parameters": count_parameters(student.model),
            "macs": count_macs(student.model, config.image_size)}


def _distillation_table(parity: dict[str, Any], baseline: dict[str, Any],
                        manifest: dict[str, Any]) -> dict[str, Any]:
    """Teacher / ground-truth-only student / distilled student on val (PyTorch), with the
    fraction of the teacher-baseline gap the distillation closed, per metric."""
    from pipeline.distill import gap_closed

    ap = parity["ap"]
    rows = [{"model": "teacher", **_ap_fields(ap["teacher"]),
             "parameters": manifest["teacher"]["parameters"],
             "macs": manifest["teacher"]["macs"]["total"]}]
    if "metrics" in baseline:
        rows.append({"model": "student, ground truth only", **_ap_fields(baseline["metrics"]),
                     "parameters": baseline["parameters"], "macs": baseline["macs"]["total"]})
    rows.append({"model": "student, distilled", **_ap_fields(ap["student_fp32_torch"]),
                 "parameters": manifest["student"]["parameters"],
                 "macs": manifest["student"]["macs"]["total"]})
    closed = None
    if "metrics" in baseline:
        closed = {k: gap_closed(ap["teacher"][k], baseline["metrics"][k],
                                ap["student_fp32_torch"][k])
                  for k in ("mask_ap", "box_ap", "mask_ap50")}
        closed = {k: (round(v, 4) if v is not None else None) for k, v in closed.items()}
    return {"rows": rows, "gap_closed": closed, "baseline": baseline,
            "what": "PyTorch FP32 on the val set; the baseline is trained on ground truth alone "
                    "with the same steps, batch, schedule and seed, without the teacher"}


def _ap_fields(m: dict[str, float]) -> dict[str, float]:
    return {k: m[k] for k in ("box_ap", "box_ap50", "mask_ap", "mask_ap50")}


def _stage_export(stages: _Stages, student, student_hash: str) -> Path:
    from pipeline.export import export_graphs

    t0 = stages.begin("export")
    key_parts = {"student": student_hash, "opset": 17, "version": __version__}
    key = hash_json(key_parts)
    entry = stages.cache.lookup("export", key)
    cached = entry is not None
    if entry is None:
        with stages.cache.build("export", key, key_parts) as tmp:
            export_graphs(student.model, tmp, opset=17)
        entry = stages.cache.lookup("export", key)
    stages.end("export", t0, cached, entry, "3 static ONNX graphs (FP32)")
    return entry


def _quant_settings(config: BuildConfig, profile):
    q = profile.quantization
    changes = {}
    if config.calib_method:  # every graph, heads included
        changes["calibrate_method"] = config.calib_method
        changes["head_calibrate_method"] = None
    if config.per_channel is not None:
        changes["per_channel"] = config.per_channel
    return q.with_(**changes) if changes else q


def _stage_calibrate_quantize(stages: _Stages, config: BuildConfig, target, profile,
                              export_dir: Path, data: _Data) -> tuple[Path, dict, dict]:
    from calibration.sets import build_calibration_set, collect_graph_inputs
    from maskedge_runner.engine import Engine

    t0 = stages.begin("calibrate")
    calib = build_calibration_set(data.calib_paths, count=config.calib_count,
                                  image_size=config.image_size, strict=config.strict)
    stages.end("calibrate", t0, False, None,
               f"{calib.manifest['count']} images, set hash {calib.manifest['set_sha256'][:12]}")

    t0 = stages.begin("quantize")
    settings = _quant_settings(config, profile)
    key_parts = {"export": export_dir.name, "calibration": calib.manifest["set_sha256"],
                 "settings": settings.to_dict(), "target": target.name, "version": __version__}
    key = hash_json(key_parts)
    entry = stages.cache.lookup(f"quantize-{target.name}", key)
    cached = entry is not None
    if entry is None:
        engine = Engine.from_dir(export_dir, precision="fp32")
        inputs = collect_graph_inputs(engine, calib.images)
        with stages.cache.build(f"quantize-{target.name}", key, key_parts) as tmp:
            report = target.quantize(export_dir, tmp, inputs, settings)
            (tmp / "quantize.json").write_text(json.dumps(report, indent=2, default=str))
            (tmp / "calibration.json").write_text(json.dumps(calib.manifest, indent=2))
        entry = stages.cache.lookup(f"quantize-{target.name}", key)
    report = json.loads((entry / "quantize.json").read_text())
    stages.end("quantize", t0, cached, entry, f"INT8 ({settings.calibrate_method}, "
               f"{'per-channel' if settings.per_channel else 'per-tensor'})")
    return entry, report, json.loads((entry / "calibration.json").read_text())


def _any_readable(paths: list[Path]) -> bool:
    """Whether at least one of ``paths`` decodes as an image (stops at the first that does)."""
    from maskedge_runner.preprocess import ImageReadError, load_image

    for path in paths:
        try:
            load_image(path)
            return True
        except ImageReadError:
            continue
    return False


def _count_lost_images(fp32: list, int8: list, score: float,
                       keep: float = 0.5) -> dict[str, Any]:
    """Images on which FP32 finds objects and INT8 as good as finds none (B09).

    An image counts when FP32's best detection scores at least ``score``; it is lost when INT8's
    best detection scores under ``keep`` times FP32's best (a head that stopped detecting, or
    whose scores collapsed). An INT8 score that merely slips under ``score`` (0.52 in FP32, 0.49
    in INT8: the demo student's only such images) is threshold jitter, not a lost image: it is
    counted apart, as ``images_slipping_under_threshold``, and not gated.
    """
    def top(d) -> float:
        return float(d.scores.max()) if len(d) else 0.0

    with_objects = [i for i, d in enumerate(fp32) if top(d) >= score]
    lost = [i for i in with_objects if top(int8[i]) < keep * top(fp32[i])]
    slipped = [i for i in with_objects if i not in lost and top(int8[i]) < score]
    return {"score_threshold": score, "keep_fraction_of_fp32_top_score": keep,
            "images_with_fp32_detections": len(with_objects),
            "images_losing_all_detections": len(lost),
            "images_slipping_under_threshold": len(slipped),
            "fraction_lost": round(len(lost) / max(1, len(with_objects)), 4)}


def _mask_sharpness(dets: list) -> float:
    """Mean |p - 0.5| of mask probabilities inside detections' boxes (0.5: crisp, 0: collapsed)."""
    values = []
    for d in dets:
        for j in range(len(d)):
            x0, y0, x1, y1 = (int(v) for v in d.boxes[j])
            patch = d.masks[j][y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
            if patch.size:
                values.append(float(abs(patch - 0.5).mean()))
    return round(float(sum(values) / len(values)), 4) if values else 0.0


def _stage_parity(stages: _Stages, config: BuildConfig, profile, staging: Path, loaded,
                  teacher_hash: str, student, student_hash: str, data: _Data,
                  backend: str) -> dict[str, Any]:
    from maskedge_runner.engine import Engine
    from pipeline.evaluate import TorchPredictor, evaluate_coco
    from pipeline.parity import compare_graphs

    t0 = stages.begin("parity")
    limit = config.val_limit
    val_key = {"val": data.val_hash}
    teacher_m = _evaluate(stages, "teacher", {"model": teacher_hash, **val_key},
                          TorchPredictor(loaded.model), data.val, limit)
    torch_m = _evaluate(stages, "student", {"model": student_hash, **val_key},
                        TorchPredictor(student.model), data.val, limit)
    options = profile.runtime.to_backend_options()
    engines = {p: Engine.from_dir(staging, precision=p, backend=backend, runtime_options=options)
               for p in ("fp32", "int8")}
    results: dict[str, list] = {"fp32": [], "int8": []}

    def recorder(precision: str):
        engine = engines[precision]

        def predict(image):
            det = engine.predict(image)
            results[precision].append(det)
            return det
        return predict

    runner_m = {p: evaluate_coco(recorder(p), data.val, limit=limit) for p in ("fp32", "int8")}
    ids = data.val.image_ids[: min(len(data.val), 16)]
    tensors = compare_graphs(engines["fp32"], engines["int8"],
                             [data.val.load_image(i) for i in ids])
    lost = _count_lost_images(results["fp32"], results["int8"], score=0.5)
    sharp = {p: _mask_sharpness(results[p]) for p in ("fp32", "int8")}
    ap = {"teacher": teacher_m, "student_fp32_torch": torch_m,
          "student_fp32": runner_m["fp32"], "student_int8": runner_m["int8"]}
    stages.end("parity", t0, False, None,
               f"mask AP teacher {teacher_m['mask_ap']:.3f} / FP32 "
               f"{runner_m['fp32']['mask_ap']:.3f} / INT8 {runner_m['int8']['mask_ap']:.3f}")
    return {"ap": ap, "tensors": tensors, "detections_lost": lost, "mask_sharpness": sharp,
            "through": f"bundle runner (maskedge_runner.engine, {backend})",
            "val_images": int(runner_m["int8"]["images"])}


def _judge(parity: dict[str, Any], latency: dict[str, Any], profile) -> dict[str, Any]:
    """Apply the profile's budgets; every check says what it compared."""
    budgets = profile.budgets
    fp32, int8 = parity["ap"]["student_fp32"], parity["ap"]["student_int8"]
    checks = []

    def check(name: str, value: float, limit: float, ok: bool, what: str) -> None:
        checks.append({"check": name, "value": round(value, 4), "limit": limit, "passed": ok,
                       "what": what})

    mask_drop = 100.0 * (fp32["mask_ap"] - int8["mask_ap"])
    box_drop = 100.0 * (fp32["box_ap"] - int8["box_ap"])
    check("mask_ap_drop", mask_drop, budgets.max_mask_ap_drop,
          mask_drop <= budgets.max_mask_ap_drop,
          "INT8 mask AP below the FP32 student, AP points (through the bundle runner)")
    check("box_ap_drop", box_drop, budgets.max_box_ap_drop, box_drop <= budgets.max_box_ap_drop,
          "INT8 box AP below the FP32 student, AP points")
    lost = parity["detections_lost"]["fraction_lost"]
    check("images_losing_detections", lost, budgets.max_lost_image_fraction,
          lost <= budgets.max_lost_image_fraction,
          "fraction of val images with an FP32 detection (score>=0.5) on which INT8's best "
          "scores under half of FP32's best")
    sharp = parity["mask_sharpness"]
    ratio = sharp["int8"] / sharp["fp32"] if sharp["fp32"] else 1.0
    check("mask_sharpness_ratio", ratio, 0.8, ratio >= 0.8,
          "INT8/FP32 mean |p-0.5| of mask probabilities (a collapsed mask head -> 0)")
    p90 = latency["int8"]["end_to_end_ms"]["p90"]
    gated = bool(latency.get("gated", False))
    checks.append({"check": "latency_p90_ms", "value": p90,
                   "limit": budgets.latency_p90_ms,
                   "passed": (p90 <= budgets.latency_p90_ms) if gated else None,
                   "what": "INT8 end-to-end p90; " + latency.get("gating_note", "")})
    rss = latency["int8"].get("peak_rss_mb")
    if rss is not None:
        checks.append({"check": "peak_memory_mb", "value": rss, "limit": budgets.memory_mb,
                       "passed": (rss <= budgets.memory_mb) if gated else None,
                       "what": "peak resident memory of the INT8 runner process; gated with "
                               "latency"})
    failed = [c for c in checks if c["passed"] is False]
    return {"passed": not failed, "checks": checks,
            "reasons": [f"{c['check']} = {c['value']} (limit {c['limit']}): {c['what']}"
                        for c in failed]}


KNOWN_LIMITATIONS = [
    "Images are processed one at a time (batch size 1); a list of images is run in sequence.",
    "Inputs are letterboxed to a fixed square size; boxes and masks are mapped back to the "
    "original image.",
    "Latency figures are host measurements with the profile's thread count unless the manifest "
    "says they were taken on the device; run `python -m maskedge_runner.bench` on the board.",
    "Anchors, NMS, RoIAlign and mask pasting run in numpy on the host CPU.",
]


def _write_sample(staging: Path, val) -> Path:
    """One validation image in ``samples/``: the bench's default input, on the host and device."""
    from PIL import Image

    folder = staging / "samples"
    folder.mkdir(exist_ok=True)
    image_id = val.image_ids[0]
    path = folder / "sample.png"
    Image.fromarray(val.load_image(image_id)).save(path)
    return path


def _host() -> dict[str, Any]:
    import os

    from maskedge_runner.bench import cpu_features

    return {"machine": platform.machine(), "system": platform.system(),
            "python": platform.python_version(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "isa": cpu_features()}


def _summary_table(manifest: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ap = manifest["parity"]["ap"]
    lat = manifest["latency"]
    sizes = manifest["sizes_mb"]
    table = Table(title=f"maskedge build: {manifest['target']} / {manifest['profile']['name']} "
                        f"-> {manifest['status'].upper()}")
    for col in ("model", "box AP", "mask AP", "mask AP50", "size MB", "p50 ms", "p90 ms"):
        table.add_column(col, justify="right" if col != "model" else "left")
    rows = [("teacher (PyTorch)", ap["teacher"], sizes.get("teacher"), None),
            ("student FP32", ap["student_fp32"], sizes.get("fp32"), lat.get("fp32")),
            ("student INT8", ap["student_int8"], sizes.get("int8"), lat.get("int8"))]
    for name, m, size, lat_p in rows:
        e2e = (lat_p or {}).get("end_to_end_ms", {})
        table.add_row(name, f"{m['box_ap']:.3f}", f"{m['mask_ap']:.3f}", f"{m['mask_ap50']:.3f}",
                      f"{size:.1f}" if size else "-",
                      f"{e2e['p50']:.1f}" if e2e else "-", f"{e2e['p90']:.1f}" if e2e else "-")
    console = Console()
    console.print(table)
    comparison = manifest["distillation"].get("comparison") or {}
    closed = (comparison.get("gap_closed") or {}).get("mask_ap")
    base = next((r for r in comparison.get("rows", []) if "ground truth" in r["model"]), None)
    if base is not None:
        console.print(f"  ground-truth-only student (same budget): mask AP "
                      f"{base['mask_ap']:.3f}; distillation closed "
                      + (f"{100 * closed:.0f} %" if closed is not None else "n/a")
                      + " of the teacher gap")
    for c in manifest["gate"]["checks"]:
        mark = {True: "pass", False: "FAIL", None: "not gated"}[c["passed"]]
        console.print(f"  {mark:>9}  {c['check']} = {c['value']} (limit {c['limit']})")
    console.print(f"bundle: {manifest['bundle_path']}")


def _distillation_lines(comparison: dict[str, Any] | None) -> list[str]:
    if not comparison:
        return []
    lines = ["", "## Distillation (PyTorch FP32, val set)", "",
             "| model | box AP | mask AP | mask AP50 | parameters | GMACs |",
             "|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        lines.append(f"| {r['model']} | {r['box_ap']:.4f} | {r['mask_ap']:.4f} | "
                     f"{r['mask_ap50']:.4f} | {r['parameters'] / 1e6:.2f} M | "
                     f"{r['macs'] / 1e9:.2f} |")
    closed = comparison.get("gap_closed")
    lines.append("")
    if closed:
        parts = [f"{k.replace('_', ' ')} {100 * v:.0f} %" for k, v in closed.items()
                 if v is not None]
        lines.append("Fraction of the teacher - ground-truth-only gap closed by distillation: "
                     + (", ".join(parts) or "no gap to close") + ".")
    else:
        lines.append(f"No ground-truth-only baseline: {comparison['baseline'].get('skipped')}.")
    lines.append(comparison["what"] + ".")
    return lines


def _counts(counter: dict[str, int], examples: dict[str, list[Any]]) -> str:
    return ", ".join(f"{reason} {n}" + (f" (e.g. {examples[reason][:3]})"
                                        if examples.get(reason) else "")
                     for reason, n in sorted(counter.items()))


def _data_lines(manifest: dict[str, Any]) -> list[str]:
    """The report's data-quality and calibration sections: what was read, dropped and why."""
    data, calib = manifest["data"], manifest["calibration"]["manifest"]
    lines = ["", "## Data", ""]
    lines += [f"- {name}: {source}" for name, source in data["sources"].items()]
    for name, q in data["quality"].items():
        parts = [f"{q['images']} images"]
        if q.get("annotations") or not data["sources"].get(name, "").startswith("unlabelled"):
            parts.append(f"{q['annotations']} annotations")
        if q.get("negatives"):
            parts.append(f"{q['negatives']} without objects (kept as negatives)")
        if q.get("crowd"):
            parts.append(f"{q['crowd']} crowd regions (ignored regions in evaluation)")
        lines += ["", f"**{name}** ({q['source']}): {', '.join(parts)}."]
        for label, key, what in (("skipped", "images_skipped_by_reason", "images"),
                                 ("dropped", "annotations_dropped", "annotations"),
                                 ("repaired", "annotations_repaired", "annotations")):
            counter = q.get(key) or {}
            if counter:
                lines.append(f"- {label} {sum(counter.values())} {what}: "
                             f"{_counts(counter, q.get('examples', {}))}")
        if not any(q.get(k) for k in ("images_skipped_by_reason", "annotations_dropped",
                                      "annotations_repaired")):
            lines.append("- nothing skipped, dropped or repaired")
    lines += ["", "## Calibration", "",
              f"{calib['count']} images of {calib['available']} available "
              f"({calib['selection']}; seed {calib['seed']}) from {calib['root']}; set SHA-256 "
              f"`{calib['set_sha256']}`; {calib['skipped_unreadable']} unreadable skipped."]
    warnings = calib.get("warnings") or []
    lines += [""] + [f"- **warning**: {w}" for w in warnings] if warnings else []
    return lines


def _write_report(path: Path, manifest: dict[str, Any]) -> None:
    ap = manifest["parity"]["ap"]
    lines = [f"# maskedge build report: {manifest['target']} / {manifest['profile']['name']}",
             "", f"Status: **{manifest['status']}** ({manifest['built_at']}, maskedge "
             f"{manifest['maskedge_version']}, commit {manifest['git_commit']})", "",
             "## Accuracy (COCO, val set, through the bundle runner)", "",
             "| model | box AP | box AP50 | mask AP | mask AP50 |", "|---|---|---|---|---|"]
    for name, key in (("teacher (PyTorch)", "teacher"), ("student FP32 (PyTorch)",
                      "student_fp32_torch"), ("student FP32 (runner)", "student_fp32"),
                      ("student INT8 (runner)", "student_int8")):
        m = ap[key]
        lines.append(f"| {name} | {m['box_ap']:.4f} | {m['box_ap50']:.4f} | {m['mask_ap']:.4f} | "
                     f"{m['mask_ap50']:.4f} |")
    lines += _distillation_lines(manifest["distillation"].get("comparison"))
    lines += ["", "## Gate", ""]
    for c in manifest["gate"]["checks"]:
        mark = {True: "pass", False: "FAIL", None: "not gated"}[c["passed"]]
        lines.append(f"- {mark}: `{c['check']}` = {c['value']} (limit {c['limit']}): "
                     f"{c['what']}")
    lines += ["", "## Latency", "", manifest["latency"].get("note", ""), ""]
    for p in ("fp32", "int8"):
        e = manifest["latency"][p]["end_to_end_ms"]
        lines.append(f"- {p}: p50 {e['p50']:.1f} ms, p90 {e['p90']:.1f} ms, p99 {e['p99']:.1f} ms")
    isa = manifest["host"].get("isa")
    if isa:
        lines += ["", f"Host CPU features: {', '.join(isa) or 'none of those checked'}."]
    if manifest.get("comparison"):
        lines += [""] + manifest["comparison"]["markdown"]
    if manifest["quantization"]["report"].get("markdown"):  # the target's own section
        lines += [""] + manifest["quantization"]["report"]["markdown"]
    lines += _data_lines(manifest)
    lines += ["", "Full figures: `manifest.json`.", "", "## Known limitations", ""]
    lines += [f"- {x}" for x in manifest["known_limitations"]]
    path.write_text("\n".join(lines) + "\n")


def run_build(config: BuildConfig) -> dict[str, Any]:
    """Run every stage for ``config``; return the manifest. Raises GateError on a failed gate."""
    from maskedge_runner.backends import model_file, runtime_version
    from pipeline.bundle import (
        copy_runner,
        failed_path,
        file_hashes,
        git_commit,
        new_staging,
        publish,
        write_json_atomic,
        write_tarball,
    )
    from pipeline.checkpoint import load_checkpoint
    from pipeline.latency import profile_latency
    from pipeline.models import count_macs, count_parameters, student_spec
    from targets import get_target

    started = time.perf_counter()
    target = get_target(config.target)
    profile = target.profile(config.profile)
    if config.parity_budget is not None:
        profile = profile.with_parity_budget(config.parity_budget)
    # every option is checked before any expensive stage runs
    _quant_settings(config, profile)
    student_spec(2, backbone=config.student, image_size=config.image_size)
    _distill_settings(config)
    cache = StageCache(config.artifacts / "cache")
    cache.clean_partial()
    stages = _Stages(cache)
    log.info("building %s for %s (%s)", config.target, profile.name, profile.description)

    t0 = stages.begin("load")
    teacher_path = config.checkpoint or DEMO_TEACHER
    loaded = load_checkpoint(teacher_path, arch=config.arch, num_classes=config.num_classes,
                             class_names=config.class_names, trust=config.trust_checkpoint,
                             class_names_fallback=config.val_coco or config.train_coco)
    teacher_hash = sha256_file(teacher_path)
    data = _resolve_data(config, loaded, teacher_hash)
    stages.end("load", t0, False, teacher_path, f"teacher with {len(loaded.class_names)} classes")

    student, distill_report, student_hash = _stage_distill(stages, config, loaded, teacher_hash,
                                                           data)
    baseline = _stage_baseline(stages, config, loaded, teacher_hash, data)
    export_dir = _stage_export(stages, student, student_hash)
    quant_dir, quant_report, calib_manifest = _stage_calibrate_quantize(
        stages, config, target, profile, export_dir, data)
    if target.check_profile is not None:  # what this profile asks of the converted graphs
        target.check_profile(profile, quant_report)

    staging = new_staging(config.artifacts, target.name)
    try:
        shutil.copytree(export_dir / "models" / "fp32", staging / "models" / "fp32")
        shutil.copytree(quant_dir / "models" / "int8", staging / "models" / "int8")
        if (quant_dir / "models" / "fp32").is_dir():  # the target runtime's own FP32 format
            shutil.copytree(quant_dir / "models" / "fp32", staging / "models" / "fp32",
                            dirs_exist_ok=True)
        shutil.copy2(export_dir / "graph_spec.json", staging / "graph_spec.json")
        copy_runner(staging)
        graph_spec = json.loads((staging / "graph_spec.json").read_text())
        runtime = {"name": target.runtime, "version": runtime_version(target.runtime),
                   "opset": graph_spec.get("opset"),
                   "options": profile.runtime.to_backend_options()}
        classes = [{"label": i + 1, "name": n, "category_id": c}
                   for i, (n, c) in enumerate(zip(loaded.class_names, loaded.category_ids))]
        write_json_atomic(staging / "manifest.json", {"status": "building", "runtime": runtime,
                                                      "classes": classes})

        parity = _stage_parity(stages, config, profile, staging, loaded, teacher_hash, student,
                               student_hash, data, target.backend)
        t0 = stages.begin("latency")
        sample = _write_sample(staging, data.val)
        latency = profile_latency(staging, profile, runs=config.latency_runs,
                                  warmup=config.latency_warmup, image=sample)
        stages.end("latency", t0, False, None,
                   f"INT8 p90 {latency['int8']['end_to_end_ms']['p90']:.1f} ms, "
                   f"INT8/FP32 {latency['int8_over_fp32']['end_to_end_p50']:.2f}x")
        comparison = None
        if target.compare is not None:  # other runtimes on this host, for the report
            t0 = stages.begin("compare")
            comparison = target.compare(
                staging=staging, quant_dir=quant_dir, profile=profile, val=data.val,
                limit=config.val_limit, runs=config.latency_runs, warmup=config.latency_warmup,
                image=sample, parity=parity, latency=latency)
            stages.end("compare", t0, False, None, comparison["headline"])
        gate = _judge(parity, latency, profile)
        model_files = {p: {g: model_file(target.backend, Path("models") / p,
                                         graph_spec["graphs"][g]["file"]).as_posix()
                           for g in ("backbone", "box_head", "mask_head")}
                       for p in ("int8", "fp32")}

        def size_mb(precision: str) -> float:
            files = [staging / f for f in model_files[precision].values()]
            files += [f.with_suffix(".bin") for f in files if f.with_suffix(".bin").is_file()]
            return round(sum(f.stat().st_size for f in files) / 1e6, 2)

        manifest = {
            "format": "maskedge-bundle", "format_version": 1,
            "status": "passed" if gate["passed"] else "failed",
            "maskedge_version": __version__, "git_commit": git_commit(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": None, "host": _host(),
            "target": target.name, "profile": profile.to_dict(), "config": config.to_dict(),
            "data": {"sources": data.sources, "quality": data.quality},
            "input": {**graph_spec["input"], "batch": "one image per call"},
            "classes": classes,
            "thresholds": {k: graph_spec["roi_heads"][k] for k in ("score_thresh", "nms_thresh",
                                                                   "detections_per_img")},
            "runtime": runtime,
            "models": model_files,
            "teacher": {"checkpoint": str(teacher_path), "sha256": teacher_hash,
                        "arch": loaded.spec.to_dict() if loaded.spec else loaded.arch,
                        "loaded_as": loaded.metadata.get("loaded_as"),
                        "parameters": count_parameters(loaded.model),
                        "macs": count_macs(loaded.model, config.image_size)},
            "student": {"arch": student.spec.to_dict(), "sha256": student_hash,
                        "parameters": count_parameters(student.model),
                        "macs": count_macs(student.model, config.image_size)},
            "distillation": distill_report,
            "quantization": {"settings": _quant_settings(config, profile).to_dict(),
                             "report": quant_report},
            "calibration": {"manifest_sha256": hash_json(calib_manifest),
                            "manifest": calib_manifest},
            "parity": parity, "latency": latency, "gate": gate, "comparison": comparison,
            "sizes_mb": {"teacher": round(teacher_path.stat().st_size / 1e6, 2),
                         "fp32": size_mb("fp32"),
                         "int8": size_mb("int8")},
            "stages": stages.record,
            "known_limitations": KNOWN_LIMITATIONS + list(quant_report.get("limitations", [])),
            "bundle_path": str(config.artifacts / target.name),
        }
        manifest["student"]["mac_ratio_teacher_over_student"] = round(
            manifest["teacher"]["macs"]["total"] / manifest["student"]["macs"]["total"], 2)
        manifest["distillation"]["comparison"] = _distillation_table(parity, baseline, manifest)
        _write_report(staging / "report.md", manifest)
        manifest["build_seconds"] = round(time.perf_counter() - started, 1)
        manifest["files"] = file_hashes(staging)
        # figures measured inside the staging folder name the place the bundle ends up
        final_path = config.artifacts / target.name
        if not gate["passed"]:  # the last bundle that passed stays where it is
            final_path = failed_path(final_path)
        manifest = json.loads(json.dumps(manifest, default=str).replace(str(staging),
                                                                        str(final_path)))
        write_json_atomic(staging / "manifest.json", manifest)
        if gate["passed"]:
            write_tarball(staging, target.name)
        final = publish(staging, final_path)
        if gate["passed"]:
            shutil.rmtree(failed_path(final), ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _summary_table(manifest)
    log.info("bundle %s: %s", manifest["status"], final)
    if not gate["passed"]:
        raise GateError("; ".join(gate["reasons"]) + f" (report: {final / 'report.md'})")
    return manifest
