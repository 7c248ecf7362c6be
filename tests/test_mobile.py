"""The mobile (LiteRT, full-integer INT8 TFLite) target: registry, profiles, offline conversion,
output binding, the ops checks (B14), the LiteRT runner backend and its imports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, ConversionError
from targets import get_target
from targets.mobile import ISA_FEATURES
from targets.mobile import tflite_convert as tc
from targets.mobile.options import LiteRtOptions
from targets.profiles import QuantizationSettings, load_profile

pytest.importorskip("ai_edge_litert")
try:  # TensorFlow through the target's import (triton first: TF then triton segfaults)
    tf = tc.import_tensorflow()
except ConversionError:
    pytest.skip("the mobile extra (tensorflow) is not installed", allow_module_level=True)
pytest.importorskip("onnx2tf")

REPO = Path(__file__).resolve().parent.parent
MOBILE = get_target("mobile")


# --- registry and profiles ---------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["mobile", "tflite", "LiteRT", " android ", "ios"])
def test_aliases_resolve_to_the_mobile_target(alias: str) -> None:
    assert get_target(alias) is MOBILE


def test_target_names_its_pieces() -> None:
    from maskedge_runner.backends import BACKENDS, MODEL_SUFFIXES, THREAD_OPTION, runtime_version

    assert MOBILE.backend == "litert" and MOBILE.backend in BACKENDS
    assert MODEL_SUFFIXES["litert"] == ".tflite" and THREAD_OPTION["litert"] == "num_threads"
    assert MOBILE.quantize is tc.quantize_graphs and MOBILE.check_profile is tc.check_profile
    assert MOBILE.extras == "runner-litert" and MOBILE.machines == ()
    assert set(MOBILE.profile_names()) >= {"pixel7", "android_flagship", "iphone"}
    import ai_edge_litert

    assert runtime_version("litert") == ai_edge_litert.__version__


def test_profiles_describe_phones_and_keep_the_gpu_requirement_out_of_the_runtime() -> None:
    pixel, flagship, iphone = (MOBILE.profile(n) for n in ("pixel7", "android_flagship", "iphone"))
    assert pixel.isa["dotprod"] and not pixel.isa["i8mm"] and flagship.isa["i8mm"]
    assert iphone.runtime.num_threads == 2 and "Core ML" in (iphone.accelerator or "")
    for profile in (pixel, flagship, iphone):
        assert profile.runtime.to_backend_options() == {
            "num_threads": profile.runtime.num_threads,
            "use_xnnpack": True,
        }
        assert profile.runtime.require_gpu_delegate is False
        tc.check_settings(profile.quantization)  # every shipped profile is usable as is


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("num_threads", 0, "must be >= 1"),
        ("num_threads", 32, "must be <= 16"),
        ("use_xnnpack", "yes", "must be a bool"),
        ("threads", 2, "is not a known key"),
    ],
)
def test_bad_runtime_options_name_the_key(tmp_path: Path, key: str, value, words: str) -> None:
    data = json.loads((MOBILE.profiles_dir / "pixel7.json").read_text())
    data["runtime"][key] = value
    path = tmp_path / "pixel7.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"runtime.{key}.*{words}"):
        load_profile(
            path, target="mobile", runtime_options=LiteRtOptions, isa_features=ISA_FEATURES
        )


def test_settings_the_tflite_quantizer_cannot_honour_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        tc.check_settings(
            QuantizationSettings(
                calibrate_method="entropy", weight_type="uint8", keep_float_op_types=("Conv",)
            )
        )
    text = str(info.value)
    assert "calibrate_method='entropy'" in text and "weight_type='uint8'" in text
    assert "keep_float_nodes/keep_float_op_types" in text


# --- small synthetic graphs --------------------------------------------------------------------


def _two_output_graph(path: Path) -> Path:
    """image [1,3,16,16] -> two convolutions of the same output shape; the outputs are listed
    b before a, so that a binding by position or by name order would swap them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), name)
        for name, shape, s in (
            ("wa", (8, 3, 3, 3), 0.3),
            ("wb", (8, 3, 3, 3), 0.3),
            ("ba", (8,), 0.1),
            ("bb", (8,), 0.1),
        )
    ]
    nodes = [
        helper.make_node("Conv", ["image", "wa", "ba"], ["ca"], name="/a/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["ca"], ["feat_a"], name="/a/Relu"),
        helper.make_node("Conv", ["image", "wb", "bb"], ["cb"], name="/b/Conv", pads=[1] * 4),
        helper.make_node("HardSigmoid", ["cb"], ["feat_b"], name="/b/HardSigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
        [
            helper.make_tensor_value_info("feat_b", TensorProto.FLOAT, [1, 8, 16, 16]),
            helper.make_tensor_value_info("feat_a", TensorProto.FLOAT, [1, 8, 16, 16]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _samples(n: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"image": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return tc._run_onnx(path, feeds)


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The two-output graph through :func:`convert_graph`: (onnx, out folder, report)."""
    root = tmp_path_factory.mktemp("two_outputs")
    onnx_path = _two_output_graph(root / "backbone.onnx")
    out = root / "out"
    report = tc.convert_graph(
        "backbone", onnx_path, {}, _samples(), QuantizationSettings(), out, root / "work"
    )
    return onnx_path, out, report


# --- offline conversion ------------------------------------------------------------------------


def test_no_network_refuses_every_connection_and_restores_sockets() -> None:
    saved = socket.socket.connect, socket.getaddrinfo, socket.create_connection
    with tc.no_network():
        with pytest.raises(tc.NetworkBlocked, match="converts offline"):
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        with pytest.raises(tc.NetworkBlocked):
            socket.getaddrinfo("example.org", 443)
        with socket.socket() as sock, pytest.raises(tc.NetworkBlocked):
            sock.connect(("127.0.0.1", 9))
    assert (socket.socket.connect, socket.getaddrinfo, socket.create_connection) == saved


def test_conversion_runs_offline_with_samples_made_from_calibration_inputs(two_outputs) -> None:
    # convert_graph ran with every connection refused (a fetch would have failed it); onnx2tf
    # read its sample-image file from the work folder, made of the calibration inputs
    onnx_path, _, report = two_outputs
    sample = onnx_path.parent / "work" / "backbone" / tc.ONNX2TF_SAMPLE_FILE
    data = np.load(sample)
    assert data.shape == tc.ONNX2TF_SAMPLE_SHAPE and data.dtype == np.float32
    first = np.transpose(_samples()[0]["image"][0], (1, 2, 0))  # 16 -> 128 nearest, NHWC
    np.testing.assert_array_equal(data[0, ::8, ::8], first)
    assert report["parity_vs_onnx"]["fp32"]["min_cosine"] > 0.9999


def test_a_converter_that_reaches_for_the_network_fails_the_build(
    tmp_path: Path, monkeypatch
) -> None:
    # without maskedge's sample file onnx2tf downloads one for a 3-channel image input
    onnx_path = _two_output_graph(tmp_path / "backbone.onnx")
    monkeypatch.setattr(tc, "write_onnx2tf_samples", lambda folder, samples: None)
    with pytest.raises(ConversionError, match="onnx2tf tried to reach the network"):
        tc.to_saved_model(onnx_path, tmp_path / "work", None, _samples())


def test_the_onnx_copy_gets_static_shapes_and_no_hard_sigmoid(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from targets.ort_quantize import check_quantizable

    src = _two_output_graph(tmp_path / "a.onnx")
    copy = tmp_path / "copy.onnx"
    assert tc.write_static_copy(src, copy, None) == {"HardSigmoid": 1}
    model = onnx.load(str(copy))
    assert "HardSigmoid" not in {n.op_type for n in model.graph.node}
    check_quantizable(model, copy)
    feeds = _samples(1)[0]
    ref, got = _ort(src, feeds), _ort(copy, feeds)
    np.testing.assert_allclose(got["feat_b"], ref["feat_b"], atol=1e-6)

    head = helper.make_graph(
        [helper.make_node("Relu", ["rois"], ["out"])],
        "head",
        [helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["n", 4, 7, 7])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 7, 7])],
    )
    onnx.save(
        helper.make_model(head, opset_imports=[helper.make_opsetid("", 17)]),
        str(tmp_path / "head.onnx"),
    )
    assert tc.write_static_copy(tmp_path / "head.onnx", tmp_path / "h2.onnx", 5) == {}
    fixed = onnx.load(str(tmp_path / "h2.onnx"))
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [5, 4, 7, 7]
    with pytest.raises(ConversionError, match="symbolic axis other than the first"):
        tc.write_static_copy(tmp_path / "head.onnx", tmp_path / "h3.onnx", None)


def _fpn_like_graph(path: Path) -> Path:
    """image [1,3,16,16] -> conv, HardSwish, strided conv, nearest 2x Resize with its sizes
    computed from Shape (as torch exports F.interpolate), add, conv, 1x1 stride-2 MaxPool."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
        for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (8, 8, 3, 3)))
    ]
    inits += [
        numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in (("start", [2]), ("end", [4]), ("batch_channels", [1, 8]))
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1] * 4),
        helper.make_node("HardSwish", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2"], ["c2"], pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Shape", ["h1"], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end"], ["hw"]),
        helper.make_node("Concat", ["batch_channels", "hw"], ["sizes"], axis=0),
        helper.make_node(
            "Resize",
            ["c2", "", "", "sizes"],
            ["up"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        helper.make_node("Add", ["h1", "up"], ["s"]),
        helper.make_node("Conv", ["s", "w3"], ["out"], pads=[1] * 4),
        helper.make_node("MaxPool", ["out"], ["pool"], kernel_shape=[1, 1], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "fpn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16]),
            helper.make_tensor_value_info("pool", TensorProto.FLOAT, [1, 8, 8, 8]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_rewrites_keep_the_function_and_put_the_int8_graph_in_one_xnnpack_partition(
    tmp_path: Path,
) -> None:
    # HARD_SWISH, RESIZE_NEAREST_NEIGHBOR and a 1x1 MAX_POOL_2D each split XNNPACK's int8 graph;
    # the rewritten copy computes the same values with ops it takes
    import onnx

    src = _fpn_like_graph(tmp_path / "backbone.onnx")
    copy = tmp_path / "copy.onnx"
    assert tc.write_static_copy(src, copy, None) == {
        "HardSwish": 1,
        "Resize nearest 2x": 1,
        "MaxPool 1x1": 1,
    }
    ops = {n.op_type for n in onnx.load(str(copy)).graph.node}
    assert not ops & {"HardSwish", "Resize", "MaxPool", "Shape", "Slice"}  # dead shape math too
    assert {"DepthToSpace", "Concat", "Clip"} <= ops
    for feeds in _samples(3):
        ref, got = _ort(src, feeds), _ort(copy, feeds)
        for name in ("out", "pool"):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)

    samples = [{"image": 4 * s["image"] - 2} for s in _samples()]  # reach both HardSwish knees
    report = tc.convert_graph(
        "backbone", src, {}, samples, QuantizationSettings(), tmp_path / "out", tmp_path / "work"
    )
    int8 = report["ops"]["int8"]
    assert report["onnx_rewrites"] == {"HardSwish": 1, "Resize nearest 2x": 1, "MaxPool 1x1": 1}
    assert not set(int8["op_counts"]) & {"HARD_SWISH", "RESIZE_NEAREST_NEIGHBOR", "MAX_POOL_2D"}
    assert int8["xnnpack"]["partitions"] == 1 and int8["xnnpack"]["not_delegated"] == {}
    assert int8["gpu_delegate"]["compatible"] and int8["full_integer"]
    assert report["parity_vs_onnx"]["fp32"]["min_cosine"] > 0.9999


def test_resizes_that_are_not_an_exact_nearest_doubling_are_left_alone(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def resize_graph(name: str, size: int, **attrs) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **attrs)],
            "r",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, size, size])],
            [numpy_helper.from_array(np.array([1, 4, size, size], np.int64), "sizes")],
        )
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    nearest = {
        "mode": "nearest",
        "coordinate_transformation_mode": "asymmetric",
        "nearest_mode": "floor",
    }
    for name, size, attrs in (
        ("bilinear", 16, {**nearest, "mode": "linear"}),
        ("half_pixel", 16, {**nearest, "coordinate_transformation_mode": "half_pixel"}),
        ("ceil", 16, {**nearest, "nearest_mode": "ceil"}),
        ("triple", 24, nearest),
    ):
        src = resize_graph(name, size, **attrs)
        assert tc.write_static_copy(src, tmp_path / f"{name}.copy.onnx", None) == {}, name
    assert tc.write_static_copy(
        resize_graph("double", 16, **nearest), tmp_path / "double.copy.onnx", None
    ) == {"Resize nearest 2x": 1}


# --- binding -----------------------------------------------------------------------------------


def test_outputs_are_bound_by_value_not_by_position() -> None:
    rng = np.random.default_rng(2)
    refs = [
        {"feat_0": rng.normal(size=(1, 4, 6, 6)), "feat_1": rng.normal(size=(1, 4, 6, 6))}
        for _ in range(2)
    ]
    # LiteRT lists the same two tensors NHWC, under generic names, in the other order
    results = [
        {
            "output_0": np.transpose(r["feat_1"], (0, 2, 3, 1)),
            "output_1": np.transpose(r["feat_0"], (0, 2, 3, 1)),
        }
        for r in refs
    ]
    details = {"output_0": {}, "output_1": {}}
    bound, worst = tc._bind_outputs(Path("g.onnx"), ["feat_0", "feat_1"], refs, results, details)
    assert [(b["name"], b["key"], b["perm"]) for b in bound] == [
        ("feat_0", "output_1", [0, 2, 3, 1]),
        ("feat_1", "output_0", [0, 2, 3, 1]),
    ]
    assert worst == pytest.approx(1.0)


def test_the_sidecar_binds_each_output_to_its_own_and_a_swap_is_caught(two_outputs) -> None:
    from maskedge_runner.backends import make_backend

    onnx_path, out, report = two_outputs
    assert report["parity_vs_onnx"]["int8"]["misbound_outputs"] == []
    feeds = _samples(9)[-1]  # not a calibration/binding sample
    ref = _ort(onnx_path, feeds)
    for precision, tol in (("fp32", 1e-4), ("int8", 0.08)):
        path = out / "models" / precision / "backbone.tflite"
        got = make_backend("litert", path, {"num_threads": 1})(feeds)
        for name in ("feat_a", "feat_b"):
            assert got[name].shape == ref[name].shape
            assert np.abs(got[name] - ref[name]).max() < tol * max(1.0, np.abs(ref[name]).max())

    # the same sidecar with the two output keys swapped: the parity check names both
    io = json.loads((out / "models" / "int8" / "backbone.io.json").read_text())
    keys = [b["key"] for b in io["outputs"]]
    assert len(set(keys)) == 2
    swapped = {
        **io,
        "outputs": [{**b, "key": k} for b, k in zip(io["outputs"], keys[::-1], strict=True)],
    }
    content = (out / "models" / "int8" / "backbone.tflite").read_bytes()
    parity = tc.measure_parity(onnx_path, content, swapped, _samples())
    assert parity["misbound_outputs"] == ["feat_a", "feat_b"]


def test_int8_graph_is_full_integer_with_float_io(two_outputs) -> None:
    _, out, report = two_outputs
    ops = report["ops"]["int8"]
    assert ops["full_integer"] and ops["builtin_only"] and not ops["dynamic_tensors"]
    assert ops["int8_weight_ops"] == ops["weight_ops"] == 2
    assert ops["input_types"] == ["float32"] and ops["output_types"] == ["float32", "float32"]
    assert {"QUANTIZE", "DEQUANTIZE", "CONV_2D"} <= set(ops["op_counts"])
    assert "RELU_0_TO_1" not in ops["op_counts"]  # HardSigmoid was rewritten
    assert ops["gpu_delegate"]["compatible"]
    assert ops["xnnpack"]["partitions"] >= 1
    assert (
        ops["xnnpack"]["delegated_nodes"] + sum(ops["xnnpack"]["not_delegated"].values())
        == ops["xnnpack"]["total_nodes"]
        == ops["ops_total"]
    )


def _backbone_calibration(two_outputs) -> tuple[dict, list, Path]:
    """The two-output backbone's I/O sidecar, its representative batches and its SavedModel."""
    onnx_path, out, _ = two_outputs
    io = json.loads((out / "models" / "int8" / "backbone.io.json").read_text())
    keys = {b["name"]: b["key"] for b in io["inputs"]}
    perms = {b["name"]: b["perm"] for b in io["inputs"]}
    representative = list(tc._representative(_samples(), keys, perms, 1))
    return io, representative, onnx_path.parent / "work" / "backbone" / "saved_model"


def test_an_int8_io_model_is_fed_and_read_with_its_own_scale_and_zero_point(
    two_outputs, tmp_path: Path
) -> None:
    # the same graph and calibration with int8 inputs and outputs: the backend quantizes the
    # float input and dequantizes the outputs with each tensor's scale/zero point, and must agree
    # with the float-I/O INT8 model (which does the same inside) to within one output step

    from maskedge_runner.backends import make_backend

    _, out, _ = two_outputs
    io, representative, saved = _backbone_calibration(two_outputs)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), [tc.SIGNATURE])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter(representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    (tmp_path / "backbone.tflite").write_bytes(converter.convert())
    (tmp_path / "backbone.io.json").write_text(json.dumps(io))

    int8_io = make_backend("litert", tmp_path / "backbone.tflite", {"num_threads": 1})
    details = int8_io.runner.get_input_details()
    assert {str(np.dtype(d["dtype"])) for d in details.values()} == {"int8"}
    assert all(d["quantization"][0] > 0 for d in details.values())
    float_io = make_backend("litert", out / "models" / "int8" / "backbone.tflite", {})
    feeds = _samples(9)[-1]
    got, ref = int8_io(feeds), float_io(feeds)
    for name in ("feat_a", "feat_b"):
        assert got[name].dtype == np.float32 and got[name].shape == ref[name].shape
        step = int8_io.out_details[next(b["key"] for b in io["outputs"] if b["name"] == name)][
            "quantization"
        ][0]
        assert np.abs(got[name] - ref[name]).max() <= 1.01 * step


def test_percentile_calibration_narrows_ranges_inside_min_max(two_outputs) -> None:
    # the same graph and calibration batches: percentile ranges are never wider than TFLite's
    # min-max, hold 0, and give the outputs finer steps; the record says what was done
    from maskedge_runner.litert import load_interpreter

    _, out, _ = two_outputs
    io, representative, saved = _backbone_calibration(two_outputs)

    steps, records = {}, {}
    for name, percentile in (("minmax", None), ("percentile", 99.0)):
        record: dict = {}
        content = tc.convert_tflite(
            saved,
            int8=True,
            representative=representative,
            percentile=percentile,
            calibration=record,
        )
        path = out.parent / f"{name}.tflite"
        path.write_bytes(content)
        interp = load_interpreter(path)
        steps[name] = {
            d["name"]: d["quantization"][0]
            for d in interp.get_tensor_details()
            if d["dtype"] == np.int8 and d["quantization"][0] > 0
        }
        records[name] = record
    assert records["minmax"] == {
        "method": "minmax",
        "percentile": None,
        "output_percentile": None,
        "tensors": 0,
        "narrowed": 0,
    }
    assert records["percentile"]["method"] == "percentile"
    assert 0 < records["percentile"]["narrowed"] <= records["percentile"]["tensors"]
    shared = set(steps["minmax"]) & set(steps["percentile"])
    assert shared
    assert all(steps["percentile"][n] <= steps["minmax"][n] * (1 + 1e-6) for n in shared)
    assert any(steps["percentile"][n] < 0.99 * steps["minmax"][n] for n in shared)


def test_percentile_ranges_are_exact_order_statistics(tmp_path: Path) -> None:
    # the kept tails give the exact quantiles of an inner tensor's values over all batches;
    # the model's input keeps TFLite's min-max
    class Scale(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 1000], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.nn.relu(x * 2.0) - x}  # the product is an inner tensor

    module = Scale()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={tc.SIGNATURE: module.__call__})
    rng = np.random.default_rng(4)
    batches = [{"x": rng.normal(size=(1, 1000)).astype(np.float32)} for _ in range(5)]
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"), [tc.SIGNATURE])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter(batches)
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    ranges = tc.percentile_ranges(calibrated, batches, 99.0)
    values = np.concatenate([b["x"].ravel() for b in batches])
    k = int(np.ceil(values.size * 0.01))
    expected = (0.0, 2 * np.sort(values)[-k])  # of relu(x * 2), one fused MUL
    assert any(
        lo == pytest.approx(expected[0]) and hi == pytest.approx(expected[1])
        for lo, hi in ranges.values()
    ), ranges
    # ranges hold 0 where the calibrator's min-max did (the output |x| is positive throughout:
    # it keeps its own min, TFLite's quantizer makes 0 representable itself)
    assert all(lo <= 0 <= hi or lo > 0 for lo, hi in ranges.values())
    assert all(lo < hi for lo, hi in ranges.values())
    from ai_edge_litert import interpreter as litert

    interp = litert.Interpreter(model_content=calibrated)
    inputs = {d["index"] for d in interp.get_input_details()}
    outputs = {d["index"] for d in interp.get_output_details()}
    assert inputs and not set(ranges) & inputs and outputs <= set(ranges)


def test_conversion_needs_neither_onnxsim_nor_sne4onnx(tmp_path: Path, monkeypatch) -> None:
    # onnx2tf runs the onnxsim command unless told not to, and imports sne4onnx for some options:
    # with neither on PATH nor importable the conversion still works (the mobile extra lists
    # neither)
    onnx_path = _two_output_graph(tmp_path / "backbone.onnx")
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    monkeypatch.setitem(sys.modules, "sne4onnx", None)
    saved, _ = tc.to_saved_model(onnx_path, tmp_path / "work", None, _samples())
    assert (saved / "saved_model.pb").is_file()
    assert onnx_path.read_bytes() == _two_output_graph(tmp_path / "again.onnx").read_bytes()


# --- B14: Flex ops, dynamic tensors, a profile that requires the GPU delegate -------------------


def _tflite(fn, spec, *, select: bool = False) -> bytes:
    concrete = tf.function(fn, input_signature=spec).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if select else []
    )
    return converter.convert()


@pytest.fixture(scope="module")
def synthetic_tflite() -> dict[str, bytes]:
    return {
        "flex": _tflite(
            lambda x: tf.linalg.det(x), [tf.TensorSpec([1, 3, 3], tf.float32)], select=True
        ),
        "dynamic": _tflite(lambda x: tf.where(x > 0), [tf.TensorSpec([1, 8], tf.float32)]),
        "cumsum": _tflite(lambda x: tf.math.cumsum(x, axis=1), [tf.TensorSpec([1, 8], tf.float32)]),
        "plain": _tflite(lambda x: tf.nn.relu(x) * 2.0, [tf.TensorSpec([1, 8], tf.float32)]),
    }


def test_flex_ops_and_dynamic_tensors_are_found_and_named(synthetic_tflite) -> None:
    flex = tc.inspect_tflite(synthetic_tflite["flex"], int8=False)
    assert flex["non_builtin_ops"] == ["FlexMatrixDeterminant"] and not flex["builtin_only"]
    assert flex["gpu_delegate"]["incompatible_ops"] == ["FlexMatrixDeterminant"]
    dynamic = tc.inspect_tflite(synthetic_tflite["dynamic"], int8=False)
    assert dynamic["builtin_only"] and dynamic["dynamic_tensors"] == ["Identity"]
    assert not dynamic["gpu_delegate"]["compatible"]
    plain = tc.inspect_tflite(synthetic_tflite["plain"], int8=False)
    assert plain["problems"] == [] and plain["gpu_delegate"]["compatible"]

    checks = {"fp32": flex, "int8": dynamic}
    with pytest.raises(ConversionError) as info:
        tc.check_deployable("box_head", checks)
    text = str(info.value)
    assert (
        "fp32 box_head.tflite: non-builtin ops (Flex/Select-TF or custom): "
        "FlexMatrixDeterminant" in text
    )
    assert "int8 box_head.tflite: dynamic tensors (a -1 dimension): Identity" in text


def _gpu_profile(tmp_path: Path, required: bool):
    data = json.loads((MOBILE.profiles_dir / "pixel7.json").read_text())
    data["runtime"]["require_gpu_delegate"] = required
    path = tmp_path / "pixel7.json"
    path.write_text(json.dumps(data))
    return load_profile(
        path, target="mobile", runtime_options=LiteRtOptions, isa_features=ISA_FEATURES
    )


def test_a_profile_requiring_the_gpu_delegate_fails_naming_the_ops(
    tmp_path: Path, synthetic_tflite
) -> None:
    report = {
        "graphs": {
            g: {"ops": {"int8": tc.inspect_tflite(synthetic_tflite[k], int8=False)}}
            for g, k in (("backbone", "plain"), ("box_head", "cumsum"), ("mask_head", "flex"))
        }
    }
    with pytest.raises(ConversionError) as info:
        MOBILE.check_profile(_gpu_profile(tmp_path, True), report)
    text = str(info.value)
    assert "requires LiteRT's GPU delegate" in text
    assert "box_head: CUMSUM x1: no GPU delegate kernel" in text
    assert "mask_head: FlexMatrixDeterminant x1: no GPU delegate kernel" in text
    assert "backbone" not in text
    MOBILE.check_profile(_gpu_profile(tmp_path, False), report)  # not required: no error
    compatible = {"graphs": {"backbone": report["graphs"]["backbone"]}}
    MOBILE.check_profile(_gpu_profile(tmp_path, True), compatible)


# --- the tiny student as a LiteRT bundle -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_student, tmp_path_factory, demo_data):
    from tests.litert_bundle import tiny_litert_bundle

    return tiny_litert_bundle(tiny_student, tmp_path_factory, demo_data)


def test_quantize_report_and_files(tiny) -> None:
    report, folder = tiny.report, tiny.folder
    assert report["format"] == "tflite-full-integer-int8"
    assert report["builtin_ops_only"] and report["full_integer"]
    assert set(report["versions"]) >= {"tensorflow", "onnx2tf", "ai-edge-litert"}
    ops = json.loads((folder / report["ops_report"]).read_text())
    assert ops["builtin_ops_only"] and ops["no_dynamic_tensors"] and ops["full_integer"]
    for graph in ("backbone", "box_head", "mask_head"):
        r = report["graphs"][graph]
        assert r["parity_vs_onnx"]["fp32"]["min_cosine"] > 0.9999
        assert r["parity_vs_onnx"]["int8"]["misbound_outputs"] == []
        assert ops["xnnpack_partitions_int8"][graph] == r["ops"]["int8"]["xnnpack"]["partitions"]
        for precision in ("fp32", "int8"):
            io = json.loads((folder / "models" / precision / f"{graph}.io.json").read_text())
            assert io["format"] == "maskedge-litert-io" and io["precision"] == precision
            assert (folder / r["files"][precision]["path"]).stat().st_size == r["files"][precision][
                "bytes"
            ]
    assert report["graphs"]["box_head"]["rows_per_call"] == 100
    assert report["graphs"]["mask_head"]["rows_per_call"] == tc.MASK_ROWS
    # the heads are one XNNPACK partition each; the random-weight backbone's activations give
    # ADDs scales XNNPACK refuses, so its partitions are asserted on the trained build below
    assert (
        ops["xnnpack_partitions_int8"]["box_head"]
        == ops["xnnpack_partitions_int8"]["mask_head"]
        == 1
    )
    backbone_ops = set(report["graphs"]["backbone"]["ops"]["int8"]["op_counts"])
    assert not backbone_ops & {"HARD_SWISH", "RESIZE_NEAREST_NEIGHBOR", "MAX_POOL_2D"}
    assert report["graphs"]["backbone"]["onnx_rewrites"] == {
        "HardSigmoid": 8,
        "HardSwish": 20,
        "Resize nearest 2x": 2,
        "MaxPool 1x1": 1,
    }
    assert any("XNNPACK" in note for note in report["limitations"])


def test_engine_on_litert_fp32_matches_onnxruntime(tiny) -> None:
    from maskedge_runner.engine import Engine
    from maskedge_runner.preprocess import load_image

    image = load_image(next((tiny.folder / "samples").iterdir()))
    ref = Engine.from_dir(
        tiny.export,
        precision="fp32",
        backend="onnxruntime",
        runtime_options={"intra_op_num_threads": 1},
    ).predict(image)
    engine = Engine.from_dir(tiny.folder, precision="fp32")  # backend from the manifest
    assert type(engine.graphs["backbone"]).__name__ == "LiteRtGraph"
    got = engine.predict(image)
    assert len(got) == len(ref) > 0
    np.testing.assert_allclose(got.boxes, ref.boxes, atol=1e-2)
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-4)
    int8 = Engine.from_dir(tiny.folder, precision="int8").predict(image)
    assert int8.masks.shape[1:] == image.shape[:2]


@pytest.mark.parametrize("rows", [0, 3, 8, 13])
def test_heads_run_any_number_of_rois_in_static_chunks(tiny, rows: int) -> None:
    from maskedge_runner.backends import make_backend

    path = tiny.folder / "models" / "fp32" / "mask_head.tflite"
    graph = make_backend("litert", path, {"num_threads": 1})
    onnx_path = tiny.export / "models" / "fp32" / "mask_head.onnx"
    feeds = {
        "rois": np.random.default_rng(rows).normal(size=(rows, 128, 14, 14)).astype(np.float32)
    }
    out = graph(feeds)
    if rows == 0:
        assert out["mask_logits"].shape == (0, 4, 28, 28)
        return
    np.testing.assert_allclose(out["mask_logits"], _ort(onnx_path, feeds)["mask_logits"], atol=1e-4)


def test_backend_refuses_bad_options_and_a_bundle_without_sidecar(tiny, tmp_path: Path) -> None:
    from maskedge_runner.backends import RunnerError, make_backend

    path = tiny.folder / "models" / "fp32" / "box_head.tflite"
    with pytest.raises(RunnerError, match=r"unknown litert options \['threads'\]"):
        make_backend("litert", path, {"threads": 2})
    with pytest.raises(RunnerError, match="num_threads=0: expected an integer >= 1"):
        make_backend("litert", path, {"num_threads": 0})
    lone = tmp_path / "box_head.tflite"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(RunnerError, match="box_head.io.json: not found"):
        make_backend("litert", lone, {})


def test_runner_cli_and_bench_run_the_litert_bundle(tiny, tmp_path: Path) -> None:
    image = next((tiny.folder / "samples").iterdir())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskedge_runner",
            str(tiny.folder),
            "--image",
            str(image),
            "--threads",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert list((tmp_path / "out").glob("*.overlay.png"))
    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskedge_runner.bench",
            str(tiny.folder),
            "--runs",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert result["backend"] == "litert" and result["runs"] == 2
    assert (
        result["threads"] == {"option": "num_threads", "value": 1}
        or result["threads"]["option"] == "num_threads"
    )
    assert result["runtime"]["version"] is not None
    assert result["stages_ms"]["backbone"]["mean"] > 0


_IMPORT_PROBE = """
import json, runpy, sys
sys.argv = ["maskedge_runner"] + sys.argv[1:]
try:
    runpy.run_module("maskedge_runner", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    assert not exit.code, exit.code
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""

_BASELINE_PROBE = """
import json, sys
import numpy, PIL.Image, PIL.ImageDraw, PIL.PngImagePlugin
from ai_edge_litert import interpreter
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""


def _modules(code: str, *args: str, cwd: Path) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES="))
    return {name.split(".")[0] for name in json.loads(line[len("MODULES=") :])}


def test_runner_on_litert_imports_only_numpy_pillow_and_ai_edge_litert(tiny, tmp_path) -> None:
    import shutil

    # a copy of the runner package alone, so nothing else of the repository is importable
    shutil.copytree(REPO / "maskedge_runner", tmp_path / "maskedge_runner")
    image = next((tiny.folder / "samples").iterdir())
    args = [str(tiny.folder), "--image", str(image), "--out", str(tmp_path / "out")]
    used = _modules(_IMPORT_PROBE, *args, cwd=tmp_path)
    assert list((tmp_path / "out").glob("*.overlay.png"))
    baseline = _modules(_BASELINE_PROBE, cwd=tmp_path)
    extra = used - baseline - set(sys.stdlib_module_names) - {"maskedge_runner"}
    assert extra == set(), f"the runner imports {sorted(extra)}"
    assert not used & {"tensorflow", "onnxruntime", "openvino", "torch", "onnx", "pipeline"}
    assert {"numpy", "PIL", "ai_edge_litert", "maskedge_runner"} <= used


def test_runner_works_in_a_venv_with_only_numpy_pillow_and_ai_edge_litert(tiny, tmp_path) -> None:
    import shutil

    from runner_venv import bare_venv

    python = bare_venv(tmp_path / "env", ["numpy", "pillow", "ai-edge-litert"])
    shutil.copytree(REPO / "maskedge_runner", tmp_path / "maskedge_runner")
    image = next((tiny.folder / "samples").iterdir())
    run = subprocess.run(
        [str(python), "-m", "maskedge_runner", str(tiny.folder), "--image", str(image),
         "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list((tmp_path / "out").glob("*.overlay.png"))
    probe = subprocess.run([str(python), "-c", "import tensorflow"], capture_output=True)
    assert probe.returncode != 0  # the venv really lacks the build's packages


# --- the mobile target through invoke build's stages (tiny budget) ------------------------------


def _build_config(demo_data, artifacts: Path, teacher: Path):
    from pipeline.build import BuildConfig

    return BuildConfig(
        target="mobile",
        checkpoint=teacher,
        train_coco=demo_data["train"] / "annotations.json",
        train_images=demo_data["train"] / "images",
        calib_images=demo_data["calib"] / "images",
        calib_count=4,
        val_coco=demo_data["val"] / "annotations.json",
        val_images=demo_data["val"] / "images",
        distill_steps=2,
        baseline=False,
        latency_runs=2,
        latency_warmup=1,
        artifacts=artifacts,
    )


@pytest.fixture(scope="module")
def mobile_build(demo_data, demo_teacher, tmp_path_factory):
    """A mobile build of a 2-step student; the manifest on disk (a gate may pass or fail: the
    student's AP is noise at this budget, the plumbing is what is tested)."""
    from pipeline.build import run_build
    from pipeline.errors import GateError

    artifacts = tmp_path_factory.mktemp("mobile_artifacts")
    try:
        run_build(_build_config(demo_data, artifacts, demo_teacher.path))
    except GateError:
        pass
    bundle = next(p for p in (artifacts / "mobile", artifacts / "mobile-failed") if p.exists())
    return artifacts, bundle, json.loads((bundle / "manifest.json").read_text())


@pytest.mark.slow
def test_build_writes_a_litert_bundle_with_its_ops_report(mobile_build) -> None:
    import ai_edge_litert

    from pipeline.cache import sha256_file

    _, bundle, manifest = mobile_build
    assert manifest["target"] == "mobile" and manifest["profile"]["name"] == "pixel7"
    assert manifest["runtime"]["name"] == "litert"
    assert manifest["runtime"]["version"] == ai_edge_litert.__version__
    assert manifest["runtime"]["options"] == {"num_threads": 4, "use_xnnpack": True}
    for precision in ("fp32", "int8"):
        for graph in ("backbone", "box_head", "mask_head"):
            path = manifest["models"][precision][graph]
            assert path == f"models/{precision}/{graph}.tflite"
            assert (bundle / path).is_file() and (bundle / path).with_suffix(".io.json").is_file()
    report = manifest["quantization"]["report"]
    assert report["format"] == "tflite-full-integer-int8"
    assert report["io_types"].startswith("float32 inputs and outputs")
    ops = json.loads((bundle / report["ops_report"]).read_text())
    assert ops["builtin_ops_only"] and ops["no_dynamic_tensors"] and ops["full_integer"]
    # MobileNetV3 + FPN after the ONNX rewrites: each INT8 graph is one XNNPACK partition
    assert ops["xnnpack_partitions_int8"] == {"backbone": 1, "box_head": 1, "mask_head": 1}
    assert manifest["files"][report["ops_report"]] == sha256_file(bundle / report["ops_report"])
    assert manifest["parity"]["through"] == "bundle runner (maskedge_runner.engine, litert)"
    latency = next(c for c in manifest["gate"]["checks"] if "latency" in c["check"])
    assert latency["passed"] is None  # no build host is a phone
    assert any("not on a phone" in x for x in manifest["known_limitations"])
    text = (bundle / "report.md").read_text()
    assert "## LiteRT ops (models/int8/ops_report.json)" in text
    assert "| backbone | int8 | " in text and "| yes | - | - | yes |" in text
    assert not any("ONNX Runtime" in x for x in manifest["known_limitations"])


@pytest.mark.slow
def test_build_fails_naming_the_ops_when_the_profile_requires_the_gpu_delegate(
    mobile_build, demo_data, demo_teacher, monkeypatch
) -> None:
    # the same build (every stage from the cache) with a profile that requires the GPU delegate
    # and a GPU op table without CONV_2D: the build stops after quantize, naming the op
    import dataclasses

    import targets
    from pipeline.build import run_build

    artifacts, bundle, before = mobile_build
    load = targets.load_profile

    def requiring_gpu(*args, **kwargs):
        profile = load(*args, **kwargs)
        runtime = dataclasses.replace(profile.runtime, require_gpu_delegate=True)
        return dataclasses.replace(profile, runtime=runtime)

    monkeypatch.setattr(targets, "load_profile", requiring_gpu)
    monkeypatch.setattr(tc, "GPU_DELEGATE_OPS", tc.GPU_DELEGATE_OPS - {"CONV_2D"})
    with pytest.raises(ConversionError, match=r"requires LiteRT's GPU delegate.*CONV_2D x\d+"):
        run_build(_build_config(demo_data, artifacts, demo_teacher.path))
    assert json.loads((bundle / "manifest.json").read_text())["built_at"] == before["built_at"]
