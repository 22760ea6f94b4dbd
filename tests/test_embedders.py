"""The network of fit, update and scoring run by onnxruntime or OpenVINO (``Padim(engine=...)``), ``auto``, and the
network running ahead of the statistics (``fastpadim.ahead``)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="the ONNX runtime extra is not installed (pip install 'fastpadim[runtime]')")

from fastpadim import embedders  # noqa: E402
from fastpadim.ahead import map_ordered, run_ahead  # noqa: E402
from fastpadim.cli.app import app  # noqa: E402
from fastpadim.errors import FastpadimError  # noqa: E402
from fastpadim.model import Padim  # noqa: E402
from fastpadim.onnx_runtime import installed_engines  # noqa: E402
from conftest import SMALL, with_spot  # noqa: E402
from conftest import make_surfaces as surfaces  # noqa: E402

runner = CliRunner()
ENGINES = [pytest.param(engine, marks=pytest.mark.skipif(engine not in installed_engines(),
                                                         reason=f"{engine} is not installed"))
           for engine in ("onnxruntime", "openvino")]
FOLDS = {**SMALL, "folds": "all"}  # the leave-one-out pass embeds every image a second time


@pytest.fixture(scope="module")
def train() -> list[np.ndarray]:
    return surfaces(10, seed=21)


@pytest.fixture(scope="module")
def test_images() -> list[np.ndarray]:
    images = surfaces(3, seed=22)
    return images + [with_spot(images[1])]


@pytest.fixture(scope="module")
def torch_model(train) -> Padim:
    return Padim(**FOLDS).fit(train)


def assert_same_model(expected: Padim, got: Padim, images, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(got.mean_.numpy(), expected.mean_.numpy(), rtol=0, atol=rtol * float(expected.mean_.abs().max()))
    np.testing.assert_allclose(got.threshold_, expected.threshold_, rtol=rtol)
    np.testing.assert_allclose(got.calibration_.scores, expected.calibration_.scores, rtol=rtol)
    a, b = expected.predict(images), got.predict(images)
    np.testing.assert_allclose(b.scores, a.scores, rtol=rtol)
    assert np.abs(b.maps - a.maps).max() <= rtol * a.maps.max()
    assert a.is_anomalous.tolist() == b.is_anomalous.tolist()


@pytest.mark.parametrize("engine", ENGINES)
def test_fit_through_an_engine_learns_the_torch_model(train, test_images, torch_model, engine):
    model = Padim(**FOLDS, engine=engine).fit(train)
    assert model.engine_ == engine and type(model.embedder_).__name__ == "OnnxEmbedder"
    assert model.get_params()["engine"] == engine
    assert model.embedder_.session.precision == "f32"  # asked for explicitly: OpenVINO would run bf16 on a bf16 CPU
    assert_same_model(torch_model, model, test_images)
    # the statistics it learned continue under another engine, and the history is the same
    assert model.history_[0]["digest"] == torch_model.history_[0]["digest"]


@pytest.mark.parametrize("engine", ENGINES)
def test_partial_fit_and_loading_through_an_engine(tmp_path, train, test_images, engine):
    reference = Padim(**FOLDS).fit(train[:6]).partial_fit(train[6:])
    model = Padim(**FOLDS, engine=engine).fit(train[:6]).partial_fit(train[6:])
    assert_same_model(reference, model, test_images)
    reference.save(tmp_path / "m.padim")
    loaded = Padim.load(tmp_path / "m.padim", device="cpu", engine=engine)
    assert loaded.engine_ == engine
    assert_same_model(reference, loaded, test_images)


def test_tiles_and_pooling_through_an_engine(train, test_images):
    params = {**SMALL, "image_size": 96, "tile": 64, "tile_overlap": 32, "pool": 2}
    for shared in (False, True):
        expected = Padim(**params, tile_shared=shared).fit(train)
        got = Padim(**params, tile_shared=shared, engine="onnxruntime").fit(train)
        assert got.embedder_.size == (64, 64)  # the graph takes tiles, as the extractor does
        np.testing.assert_allclose(got.predict(test_images).scores, expected.predict(test_images).scores, rtol=1e-4)


def test_auto_keeps_the_fastest_engine_that_matches(train):
    model = Padim(**SMALL, engine="auto").fit(train)
    choice = model.engine_choice_
    assert set(choice["candidates"]) == {"torch", *installed_engines()}
    assert model.engine_ == choice["engine"]
    qualified = {name: c for name, c in choice["candidates"].items() if c["qualified"]}
    assert model.engine_ == min(qualified, key=lambda name: qualified[name]["seconds"])
    for name, candidate in qualified.items():
        assert candidate["max_relative_difference"] <= embedders.AUTO_TOLERANCE


def test_auto_leaves_out_an_engine_whose_embeddings_differ(train, monkeypatch):
    real = embedders.OnnxEmbedder.__call__

    def off(self, images):
        return real(self, images) * (1 + 1e-3)  # 10x the tolerance

    monkeypatch.setattr(embedders.OnnxEmbedder, "__call__", off)
    model = Padim(**SMALL, engine="auto").prepare()
    assert model.engine_ == "torch"
    for name in installed_engines():
        candidate = model.engine_choice_["candidates"][name]
        assert not candidate["qualified"] and candidate["max_relative_difference"] > embedders.AUTO_TOLERANCE


def test_engine_refusals(monkeypatch):
    with pytest.raises(FastpadimError, match="unknown engine 'tensorrt'"):
        Padim(**SMALL, engine="tensorrt").prepare()
    monkeypatch.setattr(embedders, "installed_engines", lambda: [])
    with pytest.raises(FastpadimError, match=r"engine openvino is not installed: pip install 'fastpadim\[openvino\]'"):
        Padim(**SMALL, engine="openvino").prepare()
    assert Padim(**SMALL, engine="auto").prepare().engine_ == "torch"  # nothing else to choose from


def test_the_network_runs_ahead_in_order_and_stops_with_its_consumer():
    produced = []

    def numbers():
        for i in range(100):
            produced.append(i)
            yield i

    assert list(run_ahead(range(50), 3)) == list(range(50))
    consumer = run_ahead(numbers(), 2)
    assert [next(consumer) for _ in range(5)] == [0, 1, 2, 3, 4]
    time.sleep(0.3)
    assert len(produced) <= 5 + 2 + 1  # bounded: at most depth items (and the one being offered) ahead
    consumer.close()  # the consumer stops early: the producer thread ends
    assert not any(t.name == "fastpadim-ahead" for t in threading.enumerate())

    def failing():
        yield 1
        raise ValueError("broken image source")

    items = run_ahead(failing(), 2)
    assert next(items) == 1
    with pytest.raises(ValueError, match="broken image source"):
        next(items)


def test_map_ordered_keeps_the_order_and_one_item_per_function_at_a_time():
    busy = [threading.Lock(), threading.Lock()]
    overlapped = []

    def worker(k):
        def run(item):
            if not busy[k].acquire(blocking=False):  # two items at once on one function (one session)
                overlapped.append(item)
                return k, item
            try:
                time.sleep(0.002 * (item % 3))  # out-of-order completion
                return k, item
            finally:
                busy[k].release()
        return run

    results = list(map_ordered([worker(0), worker(1)], range(40)))
    assert [item for _, item in results] == list(range(40))
    assert [k for k, _ in results] == [i % 2 for i in range(40)]  # items alternate between the functions
    assert overlapped == []

    def failing(item):
        if item == 5:
            raise ValueError("broken part")
        return item

    items = map_ordered([failing, failing], range(10))
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="broken part"):
        next(items)


def test_cli_fit_update_and_calibrate_take_an_engine(tmp_path, train):
    from PIL import Image

    good = tmp_path / "good"
    good.mkdir()
    for i, image in enumerate(train):
        Image.fromarray(image).save(good / f"{i}.png")
    model = tmp_path / "m.padim"
    common = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--device", "cpu"]
    result = runner.invoke(app, ["fit", str(good), "-o", str(model), *common, "--engine", "onnxruntime"])
    assert result.exit_code == 0, result.output
    reference = Padim(**{**SMALL, "folds": "all"}).fit(sorted(good.glob("*.png")))
    assert Padim.load(model, device="cpu").threshold_ == pytest.approx(reference.threshold_, rel=1e-4)
    result = runner.invoke(app, ["update", str(model), str(good / "0.png"), "--device", "cpu", "--weights", "random",
                                 "--engine", "onnxruntime"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["fit", str(good), "-o", str(tmp_path / "x.padim"), *common, "--engine", "tpu"])
    assert result.exit_code != 0 and "unknown engine 'tpu'" in result.output
    assert not (tmp_path / "x.padim").exists()
    # calibrate writes into the .padim: an engine that scores its cached export is refused before any scoring
    result = runner.invoke(app, ["calibrate", str(model), "--good", str(good), "--defective", str(good), "--weights", "random",
                                 "--engine", "onnxruntime"])
    assert result.exit_code != 0 and "calibrate it with --engine torch" in result.output, result.output


@pytest.mark.skipif("openvino" not in installed_engines(), reason="OpenVINO is not installed")
def test_openvino_models_freed_in_any_order_leave_the_signal_stack_valid(train):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack when it compiles a model and puts back the one it
    found when the model is freed; freed out of order, the stack left installed was freed memory and the next SIGTERM
    killed the process with SIGSEGV (seen in the test suite). The stack must stay the one Python installed."""
    import ctypes
    import gc
    import os
    import signal

    from fastpadim.onnx_runtime import _SIGALTSTACK, _StackT

    def stack() -> int:
        current = _StackT()
        _SIGALTSTACK(None, ctypes.byref(current))
        return current.sp or 0

    before = stack()
    first = Padim(**SMALL, engine="openvino").fit(train[:4])
    second = Padim(**SMALL, engine="openvino").fit(train[4:8])
    assert stack() == before
    del first  # freed first: the plugin would put back the stack it found, Python's
    gc.collect()
    del second  # then it would put back first's, already freed
    gc.collect()
    assert stack() == before
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(1))
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered on the alternate stack: on freed memory, a SIGSEGV
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [1]


def test_same_padding_is_fixed_before_tracing_and_the_outputs_are_unchanged():
    import torch
    from timm.layers import Conv2dSame

    model = Padim(**{**SMALL, "backbone": "efficientnet_lite0"}).prepare()  # the default backbone, random weights
    size = model.preprocessing_.output_size
    extractor = model.extractor_
    same = [m for m in extractor.modules() if isinstance(m, Conv2dSame)]
    assert same, "the default backbone pads TensorFlow-style"
    fixed = embedders.fixed_padding(extractor, size)
    assert fixed is not extractor
    assert sum(isinstance(m, embedders.FixedPaddingConv) for m in fixed.modules()) == len(same)
    assert [m for m in extractor.modules() if isinstance(m, Conv2dSame)] == same  # the model's own is untouched
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert torch.equal(fixed(x), extractor(x))
    # traced, each is one Conv with uneven pads (begin ≠ end): no padding step, nothing computed per call
    graph = embedders.module_graph(extractor, size).graph

    def pads(node) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "pads"), [0, 0, 0, 0])

    uneven = [node for node in graph.node if node.op_type == "Conv" and pads(node)[:2] != pads(node)[2:]]
    assert len(uneven) == len(same) and not any(node.op_type == "Pad" for node in graph.node)
    with torch.no_grad():
        expected = extractor(x)
    got = embedders.OnnxEmbedder(extractor, size, "onnxruntime")(x)
    assert (torch.as_tensor(got) - expected).abs().max() <= 1e-4 * expected.abs().max()
