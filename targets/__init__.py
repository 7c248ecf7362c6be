"""The registry of deployment targets.

A target names its runtime backend (a key of ``maskedge_runner.backends.BACKENDS``), its quantizer
(``quantize(fp32_dir, out_dir, calibration_inputs, settings) -> report``), the schema of its
runtime options, the ISA features its profiles describe, its profiles folder and its default
profile, and optionally a ``compare`` hook that measures other runtimes beside it for the build
report and a ``check_profile`` hook that checks the quantized graphs against what the profile
requires (e.g. a delegate the graphs must be able to use). Each target is a subpackage of
``targets`` whose ``__init__`` defines ``TARGET``; adding a target means adding such a folder
(with ``profiles/*.json``) - nothing else in maskedge names targets.

    get_target("arm64")          the Target (aliases such as "aarch64" work too)
    list_targets()               every Target, by name
    get_target("arm64").profile("rpi5")   a validated HardwareProfile (default: the target's)

Reads: ``targets/<name>/profiles/*.json`` when a profile is loaded. Writes: nothing.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from targets.profiles import HardwareProfile, QuantizationSettings, load_profile

log = logging.getLogger(__name__)

Quantizer = Callable[
    [Path, Path, Mapping[str, Sequence[Mapping[str, Any]]], QuantizationSettings], dict[str, Any]
]


@dataclass(frozen=True)
class Target:
    """One deployment target: runtime, quantizer, profiles."""

    name: str
    description: str
    backend: str
    quantize: Quantizer
    runtime_options: type
    isa_features: tuple[str, ...]
    profiles_dir: Path
    default_profile: str
    aliases: tuple[str, ...] = ()
    machines: tuple[str, ...] = ()  # platform.machine() values of this target's devices
    extras: str = ""  # the pyproject extra that installs the device runtime
    # optional: other runtimes measured on the same host and val set for the report
    # (compare(context) -> {"rows": [...], "markdown": [...], ...}; see pipeline.build)
    compare: Callable[..., dict[str, Any]] | None = None
    # optional: what a profile requires of the quantized graphs beyond the quantizer's settings
    # (check_profile(profile, quantize_report) raises ConversionError naming what fails); run
    # on every build, the quantize stage cached or not
    check_profile: Callable[[HardwareProfile, Mapping[str, Any]], None] | None = None

    @property
    def runtime(self) -> str:
        """The runtime's name, as the runner's backends know it."""
        return self.backend

    def runs_natively_on(self, machine: str) -> bool:
        """Whether a host reporting ``platform.machine() == machine`` is this target's kind."""
        return machine.lower() in {m.lower() for m in self.machines}

    def profile_names(self) -> list[str]:
        return sorted(p.stem for p in self.profiles_dir.glob("*.json"))

    def profile(self, name: str | None = None) -> HardwareProfile:
        """The profile ``name`` (default: the target's default profile)."""
        name = name or self.default_profile
        known = self.profile_names()
        if name not in known:
            raise ConfigError(
                f"unknown profile {name!r} for target {self.name}; known profiles: "
                f"{', '.join(known)} (files in {self.profiles_dir})"
            )
        return load_profile(
            self.profiles_dir / f"{name}.json",
            target=self.name,
            runtime_options=self.runtime_options,
            isa_features=self.isa_features,
        )

    def profiles(self) -> list[HardwareProfile]:
        return [self.profile(n) for n in self.profile_names()]


@cache
def _registry() -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.ispkg:
            continue
        target = getattr(importlib.import_module(f"{__name__}.{module.name}"), "TARGET", None)
        if not isinstance(target, Target):
            log.debug("targets/%s has no TARGET; skipped", module.name)
            continue
        for key in (target.name, *target.aliases):
            if key in targets:
                raise ConfigError(
                    f"target name {key!r} is claimed by both {targets[key].name} "
                    f"and {target.name}; rename one"
                )
            targets[key] = target
    return targets


def list_targets() -> list[Target]:
    """Every registered target, sorted by name."""
    return sorted({t.name: t for t in _registry().values()}.values(), key=lambda t: t.name)


def get_target(name: str) -> Target:
    """The target called ``name`` (or one of its aliases); ConfigError lists the known ones."""
    registry = _registry()
    key = name.strip().lower()
    if key not in registry:
        known = ", ".join(
            t.name + (f" (aliases: {', '.join(t.aliases)})" if t.aliases else "")
            for t in list_targets()
        )
        raise ConfigError(f"unknown target {name!r}; known targets: {known}")
    return registry[key]


__all__ = ["Target", "get_target", "list_targets"]
