"""Hardware profiles: what a device is, how its runtime is set up, and what a build must meet.

A profile is a JSON file in a target's ``profiles/`` folder, named after the profile
(``targets/arm64/profiles/rpi5.json`` is the profile ``rpi5``). :func:`load_profile` reads one
into a frozen :class:`HardwareProfile`; the target that owns the folder supplies the schema of its
runtime options (ONNX Runtime session options for arm64) and the ISA features it knows, so the
same loader serves every target. Every key is checked: an unknown key, a missing one, or a value
of the wrong type or out of range raises :class:`~pipeline.errors.ConfigError` naming the file and
the key.

Reads: one profile JSON. Writes: nothing.

Known limits: figures in the shipped profiles (core counts, clocks, ISA features) are from the
vendors' data sheets, not probed on a device; budgets are project targets, not measurements.
Accelerators (e.g. the Jetson's GPU) are described but not validated by maskedge here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
OUTPUT_RANGES = ("minmax", "calibrated")
QUANT_TYPES = ("int8", "uint8")
PRESETS = ("performance", "mixed")
NNCF_FIELDS = ("preset", "ignored_names", "ignored_types", "ignored_patterns")


class RuntimeOptions(Protocol):
    """A target's runtime options: a frozen dataclass that validates itself on construction."""

    def to_backend_options(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CpuSpec:
    """The CPU the profile describes."""

    model: str
    cores: int
    threads: int
    frequency_ghz: float

    def __post_init__(self) -> None:
        _check(self.cores >= 1, "cpu.cores", self.cores, "must be >= 1")
        _check(
            1 <= self.threads <= 4 * self.cores,
            "cpu.threads",
            self.threads,
            f"must be between 1 and 4 x cores ({4 * self.cores})",
        )
        _check(
            0 < self.frequency_ghz < 10,
            "cpu.frequency_ghz",
            self.frequency_ghz,
            "must be a clock in GHz, between 0 and 10",
        )


@dataclass(frozen=True)
class Budgets:
    """What a build for this device must meet.

    AP drops are in AP points (0-100 scale): ``max_mask_ap_drop=1.0`` allows INT8 mask AP to be at
    most one point below the FP32 student's. ``max_lost_image_fraction`` bounds the share of
    validation images on which FP32 finds objects (best score >= 0.5) and INT8 as good as finds
    none (its best score under half of FP32's best) (B09).
    """

    latency_p90_ms: float
    memory_mb: float
    max_mask_ap_drop: float = 1.0
    max_box_ap_drop: float = 1.0
    max_lost_image_fraction: float = 0.02

    def __post_init__(self) -> None:
        _check(
            self.latency_p90_ms > 0, "budgets.latency_p90_ms", self.latency_p90_ms, "must be > 0"
        )
        _check(self.memory_mb > 0, "budgets.memory_mb", self.memory_mb, "must be > 0")
        for key in ("max_mask_ap_drop", "max_box_ap_drop"):
            value = getattr(self, key)
            _check(
                -100 <= value <= 100,
                f"budgets.{key}",
                value,
                "must be an AP drop in points, between -100 and 100 (negative: INT8 must beat "
                "FP32 by that much)",
            )
        _check(
            0 <= self.max_lost_image_fraction <= 1,
            "budgets.max_lost_image_fraction",
            self.max_lost_image_fraction,
            "must be a fraction between 0 and 1",
        )


@dataclass(frozen=True)
class QuantizationSettings:
    """How the static graphs are quantized for this device.

    ``keep_float_nodes``/``keep_float_op_types`` are always left in float. When a graph's INT8
    outputs drift below ``min_output_cosine`` against FP32 on the calibration inputs, the quantizer
    keeps the most sensitive layers in float too (each with the nodes around the activation it
    reads), trying at most ``max_float_layers`` of them and spending at most ``search_seconds``;
    it never lowers the threshold.
    """

    calibrate_method: str = "minmax"
    # the RoI heads' method when it should differ from the backbone's (None: the same)
    head_calibrate_method: str | None = None
    per_channel: bool = True
    activation_type: str = "int8"
    weight_type: str = "int8"
    activation_symmetric: bool = False
    reduce_range: bool = False
    percentile: float = 99.999
    # the graph outputs' ranges under entropy/percentile: "minmax" (what the calibration data
    # reached; the host code decides on the outputs' tails) or "calibrated" (the method's own)
    output_ranges: str = "minmax"
    keep_float_nodes: tuple[str, ...] = ()
    keep_float_op_types: tuple[str, ...] = ()
    min_output_cosine: float = 0.99
    max_float_layers: int = 8
    search_seconds: float = 300.0
    # NNCF (OpenVINO targets): the quantization preset (None: the quantizer's default) and the
    # IgnoredScope - OpenVINO op names, OpenVINO op types and regular expressions over op names
    # that stay in float. ONNX Runtime targets keep float with keep_float_nodes/op_types instead.
    preset: str | None = None
    ignored_names: tuple[str, ...] = ()
    ignored_types: tuple[str, ...] = ()
    ignored_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(
            self.preset is None or self.preset in PRESETS,
            "quantization.preset",
            self.preset,
            f"must be one of {', '.join(PRESETS)} (or left out)",
        )
        for pattern in self.ignored_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise _FieldError(
                    "quantization.ignored_patterns", pattern, f"is not a regular expression ({err})"
                ) from None
        _check(
            self.calibrate_method in CALIBRATION_METHODS,
            "quantization.calibrate_method",
            self.calibrate_method,
            f"must be one of {', '.join(CALIBRATION_METHODS)}",
        )
        _check(
            self.head_calibrate_method is None
            or self.head_calibrate_method in CALIBRATION_METHODS,
            "quantization.head_calibrate_method",
            self.head_calibrate_method,
            f"must be one of {', '.join(CALIBRATION_METHODS)} (or left out)",
        )
        _check(
            self.output_ranges in OUTPUT_RANGES,
            "quantization.output_ranges",
            self.output_ranges,
            f"must be one of {', '.join(OUTPUT_RANGES)}",
        )
        for key in ("activation_type", "weight_type"):
            _check(
                getattr(self, key) in QUANT_TYPES,
                f"quantization.{key}",
                getattr(self, key),
                f"must be one of {', '.join(QUANT_TYPES)}",
            )
        _check(
            90.0 <= self.percentile < 100.0,
            "quantization.percentile",
            self.percentile,
            "must be in [90, 100)",
        )
        _check(
            0.0 < self.min_output_cosine <= 1.0,
            "quantization.min_output_cosine",
            self.min_output_cosine,
            "must be in (0, 1]",
        )
        _check(
            self.max_float_layers >= 0,
            "quantization.max_float_layers",
            self.max_float_layers,
            "must be >= 0",
        )
        _check(
            self.search_seconds >= 0,
            "quantization.search_seconds",
            self.search_seconds,
            "must be >= 0",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists, not tuples), for reports and cache keys.

        The NNCF fields and ``head_calibrate_method`` are left out while they hold their
        defaults, so that the cache keys of builds that do not use them stay what they were
        before the fields existed.
        """
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for key in (*NNCF_FIELDS, "head_calibrate_method"):
            if data[key] in (None, []):
                del data[key]
        return data

    def for_graph(self, graph: str) -> QuantizationSettings:
        """The settings one graph is quantized with: the heads (``box_head``, ``mask_head``) take
        ``head_calibrate_method`` when it is set."""
        if self.head_calibrate_method is None or graph == "backbone":
            return self
        return replace(self, calibrate_method=self.head_calibrate_method)

    def with_(self, **changes: Any) -> QuantizationSettings:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class HardwareProfile:
    """One device: CPU, ISA, accelerator, runtime options, budgets and quantization settings."""

    name: str
    description: str
    target: str
    cpu: CpuSpec
    isa: dict[str, bool]
    runtime: Any  # the target's RuntimeOptions dataclass
    budgets: Budgets
    quantization: QuantizationSettings
    accelerator: str | None = None
    notes: tuple[str, ...] = ()
    path: Path | None = None

    @property
    def threads(self) -> int:
        return self.cpu.threads

    @property
    def latency_budget_ms(self) -> float:
        """The end-to-end p90 latency budget, ms."""
        return self.budgets.latency_p90_ms

    def with_parity_budget(self, max_mask_ap_drop: float) -> HardwareProfile:
        """A copy whose INT8-vs-FP32 mask AP budget is ``max_mask_ap_drop`` points."""
        return replace(self, budgets=replace(self.budgets, max_mask_ap_drop=max_mask_ap_drop))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the bundle manifest."""
        return {
            "name": self.name,
            "description": self.description,
            "target": self.target,
            "cpu": asdict(self.cpu),
            "isa": dict(self.isa),
            "accelerator": self.accelerator,
            "runtime": self.runtime.to_backend_options(),
            "budgets": asdict(self.budgets),
            "quantization": self.quantization.to_dict(),
            "notes": list(self.notes),
            "path": str(self.path) if self.path else None,
        }


class _FieldError(ConfigError):
    """A value that fails its check; :func:`load_profile` adds the file name to the message."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"{key}={value!r} {why}")
        self.key = key


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise _FieldError(key, value, why)


T = TypeVar("T")

_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Check one JSON value against a field's annotation (as written in the dataclass)."""
    annotation = annotation.replace(" ", "")
    if annotation.endswith("|None"):
        return None if value is None else _coerce(value, annotation[: -len("|None")], key)
    if annotation.startswith("tuple[") and annotation.endswith(",...]"):
        inner = annotation[len("tuple[") : -len(",...]")]
        if not isinstance(value, list):
            raise _FieldError(key, value, "must be a list")
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation in _SCALARS:
        wanted = _SCALARS[annotation]
        # JSON true/false are not numbers here, even though Python's bool is an int
        if isinstance(value, bool) and annotation != "bool" or not isinstance(value, wanted):
            raise _FieldError(key, value, f"must be a {annotation}")
        return float(value) if annotation == "float" else value
    raise AssertionError(f"no JSON rule for annotation {annotation!r} of {key}")


def build_section(cls: type[T], data: Any, prefix: str) -> T:
    """A frozen dataclass from a JSON object: every key known, every value of its field's type."""
    if not isinstance(data, dict):
        raise _FieldError(prefix, data, "must be a JSON object")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _FieldError(
            f"{prefix}.{unknown[0]}",
            data[unknown[0]],
            f"is not a known key; known keys: {', '.join(known)}",
        )
    kwargs = {}
    for name, f in known.items():
        key = f"{prefix}.{name}"
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise _FieldError(key, None, "is missing")
            continue
        kwargs[name] = _coerce(data[name], str(f.type), key)
    return cls(**kwargs)


TOP_LEVEL = (
    "name",
    "description",
    "cpu",
    "isa",
    "accelerator",
    "runtime",
    "budgets",
    "quantization",
    "notes",
)


def load_profile(
    path: Path, *, target: str, runtime_options: type, isa_features: tuple[str, ...]
) -> HardwareProfile:
    """Read and validate one profile file for ``target``.

    ``runtime_options`` is the target's runtime-options dataclass (built from the ``runtime``
    object, every key checked); ``isa_features`` the feature names the target knows (the ``isa``
    object must give each a true/false).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: profile file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON profile ({err}); fix the file") from err

    try:
        if not isinstance(data, dict):
            raise _FieldError("<top level>", type(data).__name__, "must be a JSON object")
        unknown = sorted(set(data) - set(TOP_LEVEL))
        if unknown:
            raise _FieldError(
                unknown[0],
                data[unknown[0]],
                f"is not a known key; known keys: {', '.join(TOP_LEVEL)}",
            )
        for key in ("name", "description", "cpu", "isa", "runtime", "budgets"):
            if key not in data:
                raise _FieldError(key, None, "is missing")
        name = _coerce(data["name"], "str", "name")
        _check(name == path.stem, "name", name, f"must equal the file name {path.stem!r}")
        isa = data["isa"]
        if not isinstance(isa, dict):
            raise _FieldError("isa", isa, "must be a JSON object of feature: true/false")
        for feature in sorted(set(isa) - set(isa_features)):
            raise _FieldError(
                f"isa.{feature}",
                isa[feature],
                f"is not an ISA feature {target} knows ({', '.join(isa_features)})",
            )
        for feature in isa_features:
            if feature not in isa:
                raise _FieldError(f"isa.{feature}", None, "is missing (give true or false)")
            _coerce(isa[feature], "bool", f"isa.{feature}")
        profile = HardwareProfile(
            name=name,
            description=_coerce(data["description"], "str", "description"),
            target=target,
            cpu=build_section(CpuSpec, data["cpu"], "cpu"),
            isa={f: bool(isa[f]) for f in isa_features},
            runtime=build_section(runtime_options, data["runtime"], "runtime"),
            budgets=build_section(Budgets, data["budgets"], "budgets"),
            quantization=build_section(
                QuantizationSettings, data.get("quantization", {}), "quantization"
            ),
            accelerator=_coerce(data.get("accelerator"), "str|None", "accelerator"),
            notes=_coerce(data.get("notes", []), "tuple[str,...]", "notes"),
            path=path,
        )
    except _FieldError as err:
        raise ConfigError(f"{path}: {err}; fix that key in the profile") from None
    log.debug("loaded profile %s from %s", profile.name, path)
    return profile


def check_runtime_field(ok: bool, key: str, value: Any, why: str) -> None:
    """For runtime-options dataclasses of targets: fail a check with the profile's key named."""
    _check(ok, f"runtime.{key}", value, why)


__all__ = [
    "Budgets",
    "CpuSpec",
    "HardwareProfile",
    "QuantizationSettings",
    "RuntimeOptions",
    "build_section",
    "check_runtime_field",
    "load_profile",
]
