"""The x86_64 (Intel, OpenVINO) target: registry, profiles, conversion, NNCF INT8, the backend."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, ConversionError
from targets import get_target
from targets.profiles import QuantizationSettings

pytest.importorskip("openvino")
pytest.importorskip("nncf")

REPO = Path(__file__).resolve().parent.parent
X86 = get_target("x86_64")


# --- registry and profiles ---------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["x86_64", "intel", "INTEL", " x86 ", "amd64"])
def test_aliases_resolve_to_the_x86_64_target(alias: str) -> None:
    assert get_target(alias) is X86


def test_target_names_its_pieces() -> None:
    from maskedge_runner.backends import BACKENDS, MODEL_SUFFIXES, THREAD_OPTION
    from targets.x86_64.ov_options import OpenVinoOptions

    assert X86.backend == "openvino" and X86.backend in BACKENDS
    assert MODEL_SUFFIXES["openvino"] == ".xml"
    assert THREAD_OPTION["openvino"] == "inference_num_threads"
    assert X86.runtime_options is OpenVinoOptions
    assert X86.quantize.__module__ == "targets.x86_64.ov_quantize"
    assert X86.extras == "runner-openvino" and X86.compare is not None
    assert set(X86.profile_names()) == {"laptop_avx2", "nuc_i7", "atom_x7425e"}
    assert X86.profile().name == "laptop_avx2"
    assert X86.runs_natively_on("x86_64") and X86.runs_natively_on("AMD64")
    assert not X86.runs_natively_on("aarch64")


def test_profiles_record_the_isa_facts_and_compile_on_openvino() -> None:
    from maskedge_runner.backends import openvino_config

    laptop, nuc, atom = (X86.profile(n) for n in ("laptop_avx2", "nuc_i7", "atom_x7425e"))
    assert laptop.isa["avx2"] and not laptop.isa["vnni"] and not laptop.isa["avx512"]
    assert nuc.isa["avx512"] and nuc.isa["vnni"]
    assert atom.isa["vnni"] and not atom.isa["avx512"]
    for p in (laptop, nuc, atom):
        assert p.budgets.max_mask_ap_drop == 1.0
        assert p.quantization.preset in ("performance", "mixed")
        config = openvino_config(p.runtime.to_backend_options())
        assert config["INFERENCE_NUM_THREADS"] == p.threads
        assert config["PERFORMANCE_HINT"] == "LATENCY" and config["NUM_STREAMS"] == 1
        assert config["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("num_streams", 0, "runtime.num_streams=0"),
        ("num_streams", 9, "between 1 and inference_num_threads"),
        ("performance_hint", "FAST", "LATENCY, THROUGHPUT"),
        ("scheduling_core_type", "BIG", "PCORE_ONLY"),
        ("inference_num_threads", 0, "runtime.inference_num_threads=0"),
        ("enable_cpu_pinning", "yes", "must be a bool"),
        ("affinity", "CORE", "not a known key"),
    ],
)
def test_bad_runtime_options_name_the_key(tmp_path: Path, key: str, value, words: str) -> None:
    data = json.loads((X86.profiles_dir / "laptop_avx2.json").read_text())
    data["runtime"][key] = value
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "laptop_avx2.json").write_text(json.dumps(data))
    from targets.profiles import load_profile

    with pytest.raises(ConfigError) as err:
        load_profile(folder / "laptop_avx2.json", target="x86_64",
                     runtime_options=X86.runtime_options, isa_features=X86.isa_features)
    assert words in str(err.value) and "laptop_avx2.json" in str(err.value)


def test_quantization_settings_nncf_fields() -> None:
    with pytest.raises(ConfigError, match="quantization.preset='fast'"):
        QuantizationSettings(preset="fast")
    with pytest.raises(ConfigError, match="not a regular expression"):
        QuantizationSettings(ignored_patterns=("(",))
    # fields at their defaults stay out of to_dict: ORT targets' cache keys do not change
    assert not {"preset", "ignored_names", "ignored_types", "ignored_patterns"} & set(
        get_target("arm64").profile().quantization.to_dict())
    assert QuantizationSettings(preset="mixed", ignored_types=("MatMul",)).to_dict()[
        "ignored_types"] == ["MatMul"]


def test_backend_refuses_unknown_options() -> None:
    from maskedge_runner.backends import RunnerError, openvino_config

    with pytest.raises(RunnerError, match="unknown openvino options"):
        openvino_config({"intra_op_num_threads": 2})
    with pytest.raises(RunnerError, match="performance_hint='fast'"):
        openvino_config({"performance_hint": "fast"})


# --- small synthetic graphs --------------------------------------------------------------------


def _conv_graph(path: Path, seed: int = 0) -> Path:
    """image [N,3,16,16] -> Conv+Relu -> ConvTranspose -> 'up'; a second output 'pooled'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 2, 2)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="/conv1/Conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"),
        helper.make_node("ConvTranspose", ["r1", "w2"], ["up"], name="/up/ConvTranspose",
                         strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["r1"], ["pooled"], name="/pool/GAP"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 8, 1, 1]),
         helper.make_tensor_value_info("up", TensorProto.FLOAT, ["n", 4, 32, 32])],
        [w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _samples(n: int = 12, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


@pytest.fixture()
def graph_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    (folder / "models" / "fp32").mkdir(parents=True)
    (folder / "graph_spec.json").write_text(json.dumps({"format": "maskedge-graph-spec"}))
    _conv_graph(folder / "models" / "fp32" / "mask_head.onnx")
    return folder


def test_fp32_ir_matches_onnxruntime(graph_folder: Path, tmp_path: Path) -> None:
    from maskedge_runner.backends import make_backend
    from targets.x86_64.ov_quantize import convert_graph

    onnx_path = graph_folder / "models" / "fp32" / "mask_head.onnx"
    xml = tmp_path / "ir" / "mask_head.xml"
    convert_graph(onnx_path, xml)
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    ort = make_backend("onnxruntime", onnx_path, {"intra_op_num_threads": 1})
    ov = make_backend("openvino", xml, {"inference_num_threads": 1})
    for sample in _samples(3):
        a, b = ort(sample), ov(sample)
        assert set(a) == set(b) == {"pooled", "up"}
        for name in a:
            assert a[name].shape == b[name].shape
            assert float(np.max(np.abs(a[name] - b[name]))) < 1e-4


def test_backend_binds_outputs_by_name_and_copies_them(graph_folder: Path, tmp_path: Path) -> None:
    from maskedge_runner.backends import RunnerError, make_backend
    from targets.x86_64.ov_quantize import convert_graph

    xml = tmp_path / "ir" / "mask_head.xml"
    convert_graph(graph_folder / "models" / "fp32" / "mask_head.onnx", xml)
    graph = make_backend("openvino", xml, {"inference_num_threads": 1})
    first, second = _samples(2)
    out1 = graph(first)
    kept = {k: v.copy() for k, v in out1.items()}
    out2 = graph(second)
    # outputs are bound by name, not position (the graph declares "pooled" first)
    assert out1["up"].shape == (1, 4, 32, 32) and out1["pooled"].shape == (1, 8, 1, 1)
    reference = _onnxruntime_outputs(graph_folder, first)
    for name in ("pooled", "up"):
        np.testing.assert_allclose(out1[name], reference[name], rtol=1e-4, atol=1e-5)
    # a later call does not overwrite what an earlier one returned
    for name in kept:
        np.testing.assert_array_equal(out1[name], kept[name])
        assert not np.array_equal(out1[name], out2[name])
    with pytest.raises(RunnerError, match="inputs \\['image'\\] missing"):
        graph({"rois": first["image"]})


def _onnxruntime_outputs(folder: Path, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from maskedge_runner.backends import make_backend

    ort = make_backend("onnxruntime", folder / "models" / "fp32" / "mask_head.onnx",
                       {"intra_op_num_threads": 1})
    return ort(sample)


def test_nncf_int8_on_a_tiny_graph_stays_close(graph_folder: Path, tmp_path: Path) -> None:
    from maskedge_runner.backends import make_backend

    out = tmp_path / "quant"
    inputs = {"mask_head": _samples()}
    report = X86.quantize(graph_folder, out, inputs, X86.profile().quantization)
    g = report["graphs"]["mask_head"]
    for precision in ("fp32", "int8"):
        xml = out / "models" / precision / "mask_head.xml"
        assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert (out / "graph_spec.json").is_file()
    # OpenVINO quantizes both the convolution and the transposed convolution
    assert g["quantized_compute"] == {"Convolution": 1, "ConvolutionBackpropData": 1}
    assert g["fake_quantize"] >= 2 and "FakeQuantize" not in g["op_counts_fp32"]
    assert g["conversion"]["max_abs_diff"] < 1e-4
    assert 0.98 < g["parity"]["min_cosine"] <= 1.0 + 1e-9
    assert g["parity"]["outputs"]["up"]["cosine"] < 1.0  # it really is quantized
    assert report["preset"] == "performance" and report["versions"]["nncf"]
    # the ONNX Runtime reference for the report's comparison, from the same inputs
    ref = out / "reference" / "onnxruntime" / "models" / "int8" / "mask_head.onnx"
    assert ref.is_file() and report["onnxruntime_reference"]["min_cosine"] > 0.9
    int8 = make_backend("openvino", out / "models" / "int8" / "mask_head.xml",
                        {"inference_num_threads": 1})
    fp32 = make_backend("openvino", out / "models" / "fp32" / "mask_head.xml",
                        {"inference_num_threads": 1})
    sample = _samples(1, seed=7)[0]
    a, b = fp32(sample)["up"], int8(sample)["up"]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_ignored_scope_that_matches_nothing_is_an_error(graph_folder: Path,
                                                        tmp_path: Path) -> None:
    settings = X86.profile().quantization.with_(ignored_names=("/not/a/node",),
                                                ignored_types=("ConvolutionBackpropData",))
    with pytest.raises(ConfigError) as err:
        X86.quantize(graph_folder, tmp_path / "q", {"mask_head": _samples(4)}, settings,
                     ort_reference=False)
    message = str(err.value)
    assert "/not/a/node" in message and "matches nothing" in message
    assert "/conv1/Conv" in message or "Convolution" in message  # says what does exist


def test_ignored_scope_keeps_the_matched_ops_in_float(graph_folder: Path, tmp_path: Path) -> None:
    settings = X86.profile().quantization.with_(ignored_types=("ConvolutionBackpropData",))
    report = X86.quantize(graph_folder, tmp_path / "q", {"mask_head": _samples(4)}, settings,
                          ort_reference=False)
    g = report["graphs"]["mask_head"]
    assert g["ignored_scope"]["types"] == ["ConvolutionBackpropData"]
    assert g["quantized_compute"] == {"Convolution": 1}
    assert report["onnxruntime_reference"] is None


def test_ort_keep_float_settings_are_refused(graph_folder: Path, tmp_path: Path) -> None:
    settings = X86.profile().quantization.with_(keep_float_op_types=("ConvTranspose",))
    with pytest.raises(ConfigError, match="ignored_types"):
        X86.quantize(graph_folder, tmp_path / "q", {"mask_head": _samples(2)}, settings)


def test_qoperator_onnx_is_refused_naming_the_ops(graph_folder: Path, tmp_path: Path) -> None:
    """B12: an ONNX already quantized in QOperator format gets an error listing its ops."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from targets.ort_quantize import GraphInputs

    src = graph_folder / "models" / "fp32" / "mask_head.onnx"
    qop = tmp_path / "qop" / "models" / "fp32" / "mask_head.onnx"
    qop.parent.mkdir(parents=True)
    quantize_static(str(src), str(qop), GraphInputs(_samples(4)),
                    quant_format=QuantFormat.QOperator)
    shutil.copy(graph_folder / "graph_spec.json", qop.parent.parent.parent / "graph_spec.json")
    with pytest.raises(ConversionError) as err:
        X86.quantize(qop.parent.parent.parent, tmp_path / "q", {"mask_head": _samples(2)},
                     X86.profile().quantization, ort_reference=False)
    message = str(err.value)
    assert "QLinearConv" in message and "unsupported ops" in message
    assert "com.microsoft:" in message  # QOperator-format ops outside the ONNX domain


# --- the runner on a tiny bundle ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ov_bundle(tiny_student, tmp_path_factory, demo_data):
    """The tiny student as an OpenVINO bundle: FP32 + NNCF INT8 IR, a manifest naming openvino."""
    from tests.tiny_bundle import tiny_bundle

    tiny = tiny_bundle(tiny_student, tmp_path_factory, demo_data)
    folder = tmp_path_factory.mktemp("ov_bundle")
    shutil.copy(tiny.folder / "graph_spec.json", folder / "graph_spec.json")
    shutil.copytree(tiny.folder / "samples", folder / "samples")
    report = X86.quantize(tiny.folder, folder, tiny.inputs, X86.profile().quantization,
                          ort_reference=False)
    options = X86.profile().runtime.to_backend_options()
    options["inference_num_threads"] = 1
    (folder / "manifest.json").write_text(json.dumps(
        {"runtime": {"name": "openvino", "options": options},
         "classes": [{"label": 1, "name": "thing", "category_id": 1}]}))
    return folder, report, tiny


def test_engine_runs_the_openvino_bundle_like_onnxruntime(ov_bundle) -> None:
    from maskedge_runner.engine import Engine
    from maskedge_runner.preprocess import load_image

    folder, report, tiny = ov_bundle
    assert not list((folder / "models" / "int8").glob("*.onnx"))  # IR only
    image = load_image(next((folder / "samples").iterdir()))
    ov = Engine.from_dir(folder, precision="fp32")  # backend and options from the manifest
    assert type(ov.graphs["backbone"]).__name__ == "OpenVinoGraph"
    ort = Engine.from_dir(tiny.folder, precision="fp32", backend="onnxruntime",
                          runtime_options={"intra_op_num_threads": 1})
    a, b = ort.predict(image), ov.predict(image)
    assert len(a) == len(b)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)
    int8 = Engine.from_dir(folder, precision="int8").predict(image)
    assert int8.masks.shape[1:] == image.shape[:2]
    assert all(report["graphs"][g]["fake_quantize"] > 0 for g in ("backbone", "box_head",
                                                                   "mask_head"))


def test_runner_cli_and_bench_run_the_openvino_bundle(ov_bundle, tmp_path: Path) -> None:
    folder, _, _ = ov_bundle
    image = next((folder / "samples").iterdir())
    run = subprocess.run(
        [sys.executable, "-m", "maskedge_runner", str(folder), "--image", str(image),
         "--threads", "1", "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert list((tmp_path / "out").glob("*.overlay.png"))
    bench = subprocess.run(
        [sys.executable, "-m", "maskedge_runner.bench", str(folder), "--runs", "2", "--warmup",
         "1", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert result["backend"] == "openvino" and result["runs"] == 2
    assert result["runtime_options"]["inference_num_threads"] == 1
    assert result["threads"]["option"] == "inference_num_threads"
    assert "INT8" in result["runtime"]["capabilities"]
    assert isinstance(result["host"]["isa"], list)
    assert result["stages_ms"]["backbone"]["mean"] > 0


def test_runner_works_in_a_venv_with_only_numpy_pillow_and_openvino(ov_bundle, tmp_path) -> None:
    from runner_venv import bare_venv

    folder, _, _ = ov_bundle
    python = bare_venv(tmp_path / "env", ["numpy", "pillow", "openvino"])
    shutil.copytree(REPO / "maskedge_runner", tmp_path / "maskedge_runner")
    image = next((folder / "samples").iterdir())
    run = subprocess.run(
        [str(python), "-m", "maskedge_runner", str(folder), "--image", str(image),
         "--threads", "1", "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list((tmp_path / "out").glob("*.overlay.png"))
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0  # the venv really lacks the build's packages
