"""The target registry and hardware profiles: lookup, validation, and the shipped figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from targets import Target, get_target, list_targets
from targets.ort_session import OrtSessionOptions
from targets.profiles import HardwareProfile, QuantizationSettings, load_profile

ALL_PROFILES = [(t.name, p) for t in list_targets() for p in t.profile_names()]
RPI5 = get_target("arm64").profiles_dir / "rpi5.json"


def test_registry_lists_arm64_with_its_pieces() -> None:
    names = [t.name for t in list_targets()]
    assert "arm64" in names
    assert names == sorted(names)
    arm64 = get_target("arm64")
    assert isinstance(arm64, Target)
    assert arm64.backend == arm64.runtime == "onnxruntime"
    assert arm64.default_profile == "rpi5"
    assert arm64.runtime_options is OrtSessionOptions
    assert arm64.quantize.__module__ == "targets.ort_quantize"
    assert set(arm64.profile_names()) >= {"rpi4", "rpi5", "jetson_orin_nano"}
    assert arm64.runs_natively_on("aarch64") and not arm64.runs_natively_on("x86_64")


@pytest.mark.parametrize("alias", ["arm64", "ARM64", " aarch64 ", "arm", "armv8"])
def test_aliases_resolve_to_the_same_target(alias: str) -> None:
    assert get_target(alias) is get_target("arm64")


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_target("riscv")
    assert "'riscv'" in str(err.value)
    assert "arm64" in str(err.value) and "aarch64" in str(err.value)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_target("arm64").profile("rpi3")
    message = str(err.value)
    assert "'rpi3'" in message
    for name in ("rpi4", "rpi5", "jetson_orin_nano"):
        assert name in message


@pytest.mark.parametrize(("target", "name"), ALL_PROFILES)
def test_every_shipped_profile_loads_and_is_consistent(target: str, name: str) -> None:
    from maskedge_runner.backends import BACKENDS, ort_session_options

    t = get_target(target)
    profile = t.profile(name)
    assert isinstance(profile, HardwareProfile)
    assert profile.name == name and profile.target == t.name
    assert set(profile.isa) == set(t.isa_features)
    assert 1 <= profile.threads <= 4 * profile.cpu.cores
    assert profile.budgets.latency_p90_ms > 0 and profile.budgets.memory_mb > 0
    assert t.backend in BACKENDS
    options = profile.runtime.to_backend_options()
    if t.backend == "onnxruntime":
        # the runner's own option check accepts what the profile hands it
        so, providers = ort_session_options(options)
        assert so.intra_op_num_threads == profile.threads
        assert providers == ["CPUExecutionProvider"]
    json.dumps(profile.to_dict())  # manifest-ready


def test_arm64_profiles_record_the_isa_facts() -> None:
    arm64 = get_target("arm64")
    rpi4, rpi5, orin = (arm64.profile(n) for n in ("rpi4", "rpi5", "jetson_orin_nano"))
    assert arm64.profile().name == "rpi5"
    assert rpi4.isa["dotprod"] is False and rpi4.isa["neon"] is True
    assert rpi5.isa["dotprod"] is True and orin.isa["dotprod"] is True
    assert (rpi4.cpu.cores, rpi5.cpu.cores, orin.cpu.cores) == (4, 4, 6)
    assert "A72" in rpi4.cpu.model and "A76" in rpi5.cpu.model and "A78AE" in orin.cpu.model
    assert orin.accelerator and "not validated" in orin.accelerator
    for p in (rpi4, rpi5, orin):
        assert p.budgets.max_mask_ap_drop == 1.0
        assert p.quantization.activation_type == "uint8" and p.quantization.per_channel


def _broken_profile(tmp_path: Path, edit) -> Path:
    data = json.loads(RPI5.read_text())
    edit(data)
    path = tmp_path / "rpi5.json"
    path.write_text(json.dumps(data))
    return path


def _load(path: Path) -> HardwareProfile:
    arm64 = get_target("arm64")
    return load_profile(
        path, target="arm64", runtime_options=arm64.runtime_options, isa_features=arm64.isa_features
    )


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d.update(turbo=True), "turbo"),
        (lambda d: d["cpu"].update(turbo=True), "cpu.turbo"),
        (lambda d: d["cpu"].update(threads=0), "cpu.threads"),
        (lambda d: d["cpu"].update(cores="four"), "cpu.cores"),
        (lambda d: d["budgets"].update(latency_p90_ms="fast"), "budgets.latency_p90_ms"),
        (lambda d: d["budgets"].update(max_mask_ap_drop=150), "budgets.max_mask_ap_drop"),
        (lambda d: d["budgets"].pop("memory_mb"), "budgets.memory_mb"),
        (lambda d: d["isa"].update(avx512=True), "isa.avx512"),
        (lambda d: d["isa"].pop("dotprod"), "isa.dotprod"),
        (lambda d: d["isa"].update(dotprod="yes"), "isa.dotprod"),
        (
            lambda d: d["runtime"].update(graph_optimization_level="max"),
            "runtime.graph_optimization_level",
        ),
        (lambda d: d["runtime"].update(providers=["MagicExecutionProvider"]), "runtime.providers"),
        (lambda d: d["runtime"].update(intra_op_num_threads=True), "runtime.intra_op_num_threads"),
        (
            lambda d: d["quantization"].update(calibrate_method="kl"),
            "quantization.calibrate_method",
        ),
        (
            lambda d: d["quantization"].update(head_calibrate_method="kl"),
            "quantization.head_calibrate_method",
        ),
        (
            lambda d: d["quantization"].update(activation_type="int4"),
            "quantization.activation_type",
        ),
        (
            lambda d: d["quantization"].update(keep_float_nodes="Conv_0"),
            "quantization.keep_float_nodes",
        ),
        (lambda d: d.update(name="rpi6"), "name"),
        (lambda d: d.pop("cpu"), "cpu"),
    ],
)
def test_a_bad_profile_names_the_file_and_the_key(tmp_path: Path, edit, key: str) -> None:
    path = _broken_profile(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        _load(path)
    message = str(err.value)
    assert str(path) in message
    assert key in message


def test_unreadable_profile_json_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "rpi5.json"
    path.write_text('{"name": "rpi5",')
    with pytest.raises(ConfigError, match="not a readable JSON profile"):
        _load(path)
    with pytest.raises(ConfigError, match="not found"):
        _load(tmp_path / "missing.json")


def test_a_new_profile_file_is_picked_up_by_its_target(tmp_path: Path) -> None:
    arm64 = get_target("arm64")
    folder = tmp_path / "profiles"
    shutil.copytree(arm64.profiles_dir, folder)
    data = json.loads((folder / "rpi5.json").read_text())
    data.update(name="rpi5_2t", description="Raspberry Pi 5 limited to two threads")
    data["cpu"]["threads"] = 2
    data["runtime"]["intra_op_num_threads"] = 2
    (folder / "rpi5_2t.json").write_text(json.dumps(data))
    from dataclasses import replace

    moved = replace(arm64, profiles_dir=folder)
    assert "rpi5_2t" in moved.profile_names()
    assert moved.profile("rpi5_2t").runtime.intra_op_num_threads == 2


def test_settings_copies_are_validated() -> None:
    q = QuantizationSettings()
    assert q.with_(calibrate_method="entropy").calibrate_method == "entropy"
    assert q.calibrate_method == "minmax"
    with pytest.raises(ConfigError, match="calibrate_method"):
        q.with_(calibrate_method="histogram")
    with pytest.raises(ConfigError, match="min_output_cosine"):
        QuantizationSettings(min_output_cosine=1.5)
    with pytest.raises(ConfigError, match="intra_op_num_threads"):
        OrtSessionOptions(intra_op_num_threads=0)
    profile = get_target("arm64").profile("rpi5")
    looser = profile.with_parity_budget(2.5)
    assert looser.budgets.max_mask_ap_drop == 2.5 and profile.budgets.max_mask_ap_drop == 1.0
    assert looser.latency_budget_ms == profile.budgets.latency_p90_ms
    with pytest.raises(ConfigError, match="max_mask_ap_drop"):
        profile.with_parity_budget(101.0)


def test_heads_can_calibrate_with_their_own_method() -> None:
    q = QuantizationSettings(calibrate_method="entropy", head_calibrate_method="percentile")
    assert q.for_graph("backbone").calibrate_method == "entropy"
    assert q.for_graph("box_head").calibrate_method == "percentile"
    assert q.for_graph("mask_head").calibrate_method == "percentile"
    assert QuantizationSettings(calibrate_method="entropy").for_graph("box_head") \
        .calibrate_method == "entropy"
    # left out of cache keys and reports while unset, so older cache entries stay valid
    assert "head_calibrate_method" not in QuantizationSettings().to_dict()
    assert q.to_dict()["head_calibrate_method"] == "percentile"
    rpi5 = get_target("arm64").profile("rpi5").quantization
    assert (rpi5.calibrate_method, rpi5.head_calibrate_method) == ("entropy", "percentile")


def test_calib_method_option_applies_to_every_graph() -> None:
    from pipeline.build import BuildConfig, _quant_settings

    profile = get_target("arm64").profile("rpi5")
    q = _quant_settings(BuildConfig(calib_method="minmax"), profile)
    assert {q.for_graph(g).calibrate_method for g in ("backbone", "box_head", "mask_head")} == {
        "minmax"}
