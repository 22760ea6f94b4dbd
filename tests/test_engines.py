"""A .padim model scored by the ONNX engines (its export cached beside it) and ``engine="auto"``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="the ONNX runtime extra is not installed (pip install 'fastpadim[runtime]')")

from fastpadim import engines, load  # noqa: E402
from fastpadim.cli.app import app  # noqa: E402
from fastpadim.errors import FastpadimError  # noqa: E402
from fastpadim.model import Padim  # noqa: E402
from fastpadim.onnx_runtime import OnnxPadim  # noqa: E402
from conftest import SMALL, with_spot  # noqa: E402
from conftest import make_surfaces as surfaces  # noqa: E402

runner = CliRunner()
HAS_OPENVINO = "openvino" in engines.installed_engines()


@pytest.fixture(scope="module")
def small_model() -> Padim:
    return Padim(**{**SMALL, "holdout": 0.25}).fit(surfaces(8, seed=11))


@pytest.fixture
def model_file(tmp_path, small_model) -> Path:
    path = tmp_path / "small.padim"
    small_model.save(path)
    return path


@pytest.fixture(scope="module")
def test_images() -> list[np.ndarray]:
    images = surfaces(3, seed=5)
    return images + [with_spot(images[0])]


def assert_same_outputs(expected, got, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(got.scores, expected.scores, rtol=rtol, atol=0)
    scale = expected.maps.reshape(len(expected.maps), -1).max(axis=1)[:, None, None]
    assert np.all(np.abs(got.maps - expected.maps) <= rtol * scale)
    np.testing.assert_array_equal(got.is_anomalous, expected.is_anomalous)


def cache_entries(model_file: Path) -> list[str]:
    cache = model_file.with_name(model_file.name + engines.CACHE_SUFFIX)
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


@pytest.mark.parametrize("engine", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    not HAS_OPENVINO, reason="OpenVINO is not installed"))])
def test_padim_scored_by_an_onnx_engine_gives_the_torch_outputs(model_file, test_images, engine):
    torch_model = load(model_file, device="cpu")
    model = load(model_file, device="cpu", engine=engine)
    assert isinstance(model, OnnxPadim) and model.engine == engine and model.precision == "f32"
    expected, got = torch_model.predict(test_images), model.predict(test_images)
    assert expected.threshold is not None and got.threshold == pytest.approx(expected.threshold)
    assert_same_outputs(expected, got)
    # the export lies in the cache beside the model, named by the model file's digest
    assert cache_entries(model_file) == [engines.cache_entry_name(model_file)]
    assert model.path.parent.name == engines.cache_entry_name(model_file) and model._export_dir is None


def test_the_cache_is_reused_and_a_changed_model_gets_a_new_entry_replacing_the_old(model_file, test_images, monkeypatch):
    first = load(model_file, device="cpu", engine="onnxruntime")
    data = first.path.with_name(first.path.name + ".data")
    mtimes = (first.path.stat().st_mtime_ns, data.stat().st_mtime_ns)
    calls = []
    real = engines._export_into_cache
    monkeypatch.setattr(engines, "_export_into_cache", lambda *a: calls.append(a) or real(*a))
    again = load(model_file, device="cpu", engine="onnxruntime")
    assert calls == [] and again.path == first.path
    assert (first.path.stat().st_mtime_ns, data.stat().st_mtime_ns) == mtimes
    # a half-written entry (the data file only) is never used: it is exported again
    first.path.unlink()
    load(model_file, device="cpu", engine="onnxruntime")
    assert len(calls) == 1 and first.path.is_file()
    # the model re-saved after partial_fit: another file, another entry, its own scores; an entry of the
    # earlier export format (named by the digest alone) is removed with the stale one
    (first.path.parent.parent / engines.file_digest(model_file)).mkdir()
    torch_model = load(model_file, device="cpu")
    torch_model.partial_fit(surfaces(2, seed=21), threshold_images=surfaces(4, seed=22))
    torch_model.save(model_file)
    changed = load(model_file, device="cpu", engine="onnxruntime")
    assert len(calls) == 2 and changed.path != first.path
    assert cache_entries(model_file) == [engines.cache_entry_name(model_file)]  # the stale entry is removed
    assert_same_outputs(torch_model.predict(test_images), changed.predict(test_images))
    assert not any(name.startswith(".") for name in cache_entries(model_file))  # no temporary folder left


def test_auto_picks_a_qualified_engine(model_file, test_images):
    model = load(model_file, device="cpu", engine="auto")
    choice = model.engine_choice_
    assert set(choice["candidates"]) == {"torch", *engines.installed_engines()}
    picked = choice["candidates"][choice["engine"]]
    assert picked["qualified"] and picked["max_relative_score_difference"] <= 1e-4
    qualified = {name: c["seconds"] for name, c in choice["candidates"].items() if c["qualified"]}
    assert choice["engine"] == min(qualified, key=qualified.get)
    for candidate in choice["candidates"].values():
        assert candidate["seconds"] > 0
    assert (model.engine if isinstance(model, OnnxPadim) else "torch") == choice["engine"]
    assert_same_outputs(load(model_file, device="cpu").predict(test_images), model.predict(test_images))


@pytest.mark.parametrize("engine, precision, text", [
    ("tensorrt", None, "unknown engine 'tensorrt' (use torch, onnxruntime, openvino, auto)"),
    ("auto", "bf16", "--engine auto compares engines in f32 only"),
    ("torch", "bf16", "the PyTorch engine computes in f32"),
    ("onnxruntime", "bf16", "onnxruntime computes in f32"),
    ("openvino", "fp8", "unknown precision 'fp8'"),
])
def test_bad_engine_or_precision_is_one_line(model_file, engine, precision, text):
    with pytest.raises(FastpadimError) as error:
        load(model_file, device="cpu", engine=engine, precision=precision)
    assert text in str(error.value) and len(str(error.value).splitlines()) == 1
    assert cache_entries(model_file) == []  # refused before any export


def test_a_missing_model_file_is_one_line(tmp_path):
    with pytest.raises(FastpadimError) as error:
        load(tmp_path / "absent.padim", engine="onnxruntime")
    assert len(str(error.value).splitlines()) == 1


def test_cli_predict_with_the_onnxruntime_engine(model_file, test_images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(test_images):
        Image.fromarray(image).save(folder / f"{i}.png")

    def scores(engine: str) -> dict[str, tuple[float, str]]:
        out = tmp_path / f"out-{engine}"
        result = runner.invoke(app, ["predict", str(model_file), str(folder), "-o", str(out), "--engine", engine,
                                     "--device", "cpu", "--no-maps"])
        assert result.exit_code == 0, result.output
        rows = csv.DictReader((out / "results.csv").open())
        return {Path(row["image"]).name: (float(row["score"]), row["verdict"]) for row in rows}

    expected, got = scores("torch"), scores("onnxruntime")
    assert sorted(got) == sorted(expected) and len(got) == 4
    for name, (score, verdict) in expected.items():
        assert got[name][0] == pytest.approx(score, rel=1e-4) and got[name][1] == verdict
    assert cache_entries(model_file) == [engines.cache_entry_name(model_file)]


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(model_file, test_images, monkeypatch):
    """A folder the cache cannot be written in (made so by the patch: chmod makes nothing read-only for root, as
    tests run in CI): the export goes to a temporary folder that lives as long as the model."""
    def refuse(model, entry):
        raise PermissionError(13, "Permission denied", str(entry.parent))

    monkeypatch.setattr(engines, "_export_into_cache", refuse)
    monkeypatch.setattr(engines, "_writable", lambda folder: False)
    model = load(model_file, device="cpu", engine="onnxruntime")
    temporary = Path(model._export_dir.name)
    assert model.path.parent == temporary and cache_entries(model_file) == []
    assert_same_outputs(load(model_file, device="cpu").predict(test_images), model.predict(test_images))
    model._export_dir.cleanup()
    assert not temporary.exists()
    # a failure where the cache could be written is not hidden
    monkeypatch.setattr(engines, "_writable", lambda folder: True)
    with pytest.raises(PermissionError):
        load(model_file, device="cpu", engine="onnxruntime")
