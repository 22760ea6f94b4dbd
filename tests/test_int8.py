"""Int8 backbones in ONNX exports (fastpadim.quantize, ``export --int8``): both engines run them, scores stay
close to the float32 export's without being equal, the metadata says so, and refusals are one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import SMALL, make_surfaces

from fastpadim import Padim
from fastpadim.errors import FastpadimError
from fastpadim.export import export_onnx
from fastpadim.onnx_runtime import METADATA_KEY, OnnxPadim, check_metadata, read_metadata
from fastpadim.quantize import MIN_CALIBRATION_IMAGES

pytest.importorskip("nncf")
pytest.importorskip("openvino")

# Measured with these random-weight 64 px models (3 seeds): up to 14 % on single images, median under 1 %; a broken
# quantisation (wrong input scale, clipped activations) moves scores by far more.
MAX_RELATIVE_CHANGE = 0.4
MEDIAN_RELATIVE_CHANGE = 0.03


@pytest.fixture(scope="module")
def good():
    return make_surfaces(16, seed=1)


@pytest.fixture(scope="module")
def model(good):
    return Padim(**SMALL).fit(good)


@pytest.fixture(scope="module")
def exports(model, good, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    export_onnx(model, folder / "f32.onnx")
    export_onnx(model, folder / "int8.onnx", int8_images=good)
    return folder / "f32.onnx", folder / "int8.onnx"


def test_graph_holds_quantize_dequantize_nodes(exports):
    f32, int8 = (onnx.load(str(path), load_external_data=False) for path in exports)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {node.op_type for node in f32.graph.node}
    ops = [node.op_type for node in int8.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 10
    # the scoring part is appended unchanged, in float32
    assert [n.op_type for n in f32.graph.node if n.name.startswith("padim") or n.output[0].startswith("padim")] == \
        [n.op_type for n in int8.graph.node if n.name.startswith("padim") or n.output[0].startswith("padim")]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_int8_scores_close_to_float32_but_not_equal(exports, engine):
    test = make_surfaces(12, seed=2)
    f32, int8 = (OnnxPadim(path, engine=engine, workers=1) for path in exports)
    assert (f32.backbone_precision, int8.backbone_precision) == ("f32", "int8")
    assert "backbone_precision='int8'" in repr(int8)
    reference, scores = f32.anomaly_scores(test), int8.anomaly_scores(test)
    change = np.abs(scores - reference) / reference
    assert np.isfinite(scores).all() and change.max() > 1e-4  # really int8: not the float32 graph again
    assert change.max() < MAX_RELATIVE_CHANGE and np.median(change) < MEDIAN_RELATIVE_CHANGE


def test_metadata_records_int8_and_old_metadata_loads(exports):
    f32, int8 = (read_metadata(path)["export"] for path in exports)
    assert f32["backbone_precision"] == "f32" and "calibration_images" not in f32
    assert int8["backbone_precision"] == "int8" and int8["calibration_images"] == 16
    assert int8["weights_dtype"] == "float32"
    # an export written before the field existed: no backbone_precision → float32
    proto = onnx.load(str(exports[0]), load_external_data=False)
    meta = json.loads({e.key: e.value for e in proto.metadata_props}[METADATA_KEY])
    del meta["export"]["backbone_precision"]
    assert check_metadata(meta) is meta
    for bad in ({"backbone_precision": "int4"}, {"backbone_precision": "int8"},
                {"backbone_precision": "int8", "calibration_images": True}):
        with pytest.raises(FastpadimError, match="backbone_precision|calibration_images"):
            check_metadata({**meta, "export": {**meta["export"], **bad}})


def test_info_names_the_int8_backbone(exports):
    from typer.testing import CliRunner

    from fastpadim.cli import app

    f32, int8 = (CliRunner().invoke(app, ["info", str(path)]) for path in exports)
    assert f32.exit_code == 0 and int8.exit_code == 0
    assert "float32 weights" in f32.output and "int8 backbone" not in f32.output
    assert "int8 backbone (16 calibration images), float32 scoring" in int8.output
    assert "float32 weights" not in int8.output


def test_refusals_are_one_line_and_write_nothing(model, good, tmp_path):
    target = tmp_path / "m.onnx"
    for kwargs, message in (({"int8_images": good[: MIN_CALIBRATION_IMAGES - 1]}, "at least"),
                            ({"int8_images": []}, "at least"),
                            ({"int8_images": good, "fp16": True}, "exclude each other")):
        with pytest.raises(FastpadimError, match=message) as info:
            export_onnx(model, target, **kwargs)
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
