"""The model file: exact round trip, one clear error for each way a file can be wrong, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import SMALL
from fastpadim import Padim
from fastpadim.errors import FastpadimError
from fastpadim.modelfile import FORMAT_VERSION, atomic_write, read_model_file


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.padim"
    fitted.save(path)
    return path


def rewrite_metadata(source, target, change) -> None:
    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["fastpadim"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(meta)
    save_file(tensors, str(target), metadata={"fastpadim": json.dumps(meta)})


def test_round_trip_gives_identical_scores(fitted, saved, test_arrays):
    loaded = Padim.load(saved, device="cpu")
    expected_scores, expected_maps = fitted.score(test_arrays)
    scores, maps = loaded.score(test_arrays)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(maps, expected_maps)
    assert loaded.threshold_ == fitted.threshold_
    assert torch.equal(loaded.channel_indices_, fitted.channel_indices_)
    assert loaded.n_samples_seen_ == fitted.n_samples_seen_ and loaded.weights_id_ == fitted.weights_id_
    assert loaded.preprocessing_ == fitted.preprocessing_
    np.testing.assert_array_equal(loaded.predict(test_arrays).is_anomalous, fitted.predict(test_arrays).is_anomalous)


def test_metadata_describes_the_model(fitted, saved):
    meta, tensors = read_model_file(saved)
    assert meta["format"] == "fastpadim" and meta["format_version"] == FORMAT_VERSION
    assert meta["backbone"]["name"] == "resnet18" and meta["backbone"]["layers"] == [1, 2, 3]
    assert meta["backbone"]["n_features"] == 100 and meta["backbone"]["weights_id"] == "random"
    assert meta["preprocessing"] == {"image_size": 64, "crop_size": None, "mean": list(fitted.preset_.mean),
                                     "std": list(fitted.preset_.std)}
    assert meta["epsilon"] == 0.01 and meta["n_train_images"] == 12
    assert meta["threshold"]["image"] == fitted.threshold_ and meta["threshold"]["n_good_images"] == 4
    assert set(tensors) == {"mean", "whitener", "channel_indices"}  # no training statistics unless asked


def test_keep_stats_allows_partial_fit_after_load(train_arrays, test_arrays, saved, tmp_path):
    model = Padim(**SMALL).fit(train_arrays[:8])
    model.save(tmp_path / "stats.padim", keep_stats=True)
    loaded = Padim.load(tmp_path / "stats.padim", device="cpu").partial_fit(train_arrays[8:])
    whole = Padim(**SMALL).fit(train_arrays)
    np.testing.assert_allclose(loaded.score(test_arrays)[0], whole.score(test_arrays)[0], rtol=1e-4)
    without = Padim.load(saved, device="cpu")
    with pytest.raises(FastpadimError, match="keep_stats"):
        without.partial_fit(train_arrays[:2])


def assert_clear(exc_info, *words) -> None:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, 100, 5):
        (tmp_path / "cut.padim").write_bytes(data[:cut])
        with pytest.raises(FastpadimError) as info:
            Padim.load(tmp_path / "cut.padim", device="cpu")
        assert_clear(info, "cut.padim", "truncated")


def test_foreign_safetensors_file(tmp_path):
    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(FastpadimError) as info:
        Padim.load(tmp_path / "foreign.safetensors", device="cpu")
    assert_clear(info, "foreign.safetensors", "not a fastpadim model")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"),
              metadata={"fastpadim": json.dumps({"format": "something-else"})})
    with pytest.raises(FastpadimError) as info:
        Padim.load(tmp_path / "other.safetensors", device="cpu")
    assert_clear(info, "not a fastpadim model")


def test_random_bytes_and_empty_files(tmp_path):
    (tmp_path / "noise.padim").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.padim").write_bytes(b"")
    for name in ("noise.padim", "empty.padim"):
        with pytest.raises(FastpadimError) as info:
            Padim.load(tmp_path / name, device="cpu")
        assert_clear(info, name, "not a fastpadim model file")


def test_newer_format_version(saved, tmp_path):
    rewrite_metadata(saved, tmp_path / "future.padim", lambda meta: meta.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(FastpadimError) as info:
        Padim.load(tmp_path / "future.padim", device="cpu")
    assert_clear(info, "future.padim", "newer", "upgrade")


def test_missing_tensor_and_missing_version(saved, tmp_path):
    with safe_open(str(saved), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name != "whitener"}
    save_file(tensors, str(tmp_path / "lacking.padim"), metadata=metadata)
    with pytest.raises(FastpadimError, match="whitener"):
        Padim.load(tmp_path / "lacking.padim", device="cpu")
    rewrite_metadata(saved, tmp_path / "nover.padim", lambda meta: meta.pop("format_version"))
    with pytest.raises(FastpadimError, match="format version"):
        Padim.load(tmp_path / "nover.padim", device="cpu")


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(FastpadimError, match="no such model file"):
        Padim.load(tmp_path / "absent.padim")
    with pytest.raises(FastpadimError, match="is a folder"):
        Padim.load(tmp_path)


def test_pickle_file_is_not_loaded(tmp_path):
    torch.save({"mean": torch.zeros(2)}, tmp_path / "model.pt")  # a torch (pickle/zip) file
    with pytest.raises(FastpadimError) as info:
        Padim.load(tmp_path / "model.pt", device="cpu")
    assert_clear(info, "model.pt")


# ------------------------------------------------------------------------------------- atomic writes
def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failed_writes_leave_nothing_behind(fitted, tmp_path):
    with pytest.raises(FastpadimError, match="does not exist"):
        fitted.save(tmp_path / "no/such/folder/m.padim")
    assert not (tmp_path / "no").exists()
    (tmp_path / "taken.padim").mkdir()  # the target is a folder (tests run as root: no read-only folders)
    with pytest.raises(FastpadimError, match="taken.padim"):
        fitted.save(tmp_path / "taken.padim")
    assert (tmp_path / "taken.padim").is_dir() and not list((tmp_path / "taken.padim").iterdir())
    assert leftovers(tmp_path) == []


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as handle:
            handle.write("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(FastpadimError, match="No space left"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["kept.txt"]

    def crashing(tmp):
        raise RuntimeError("serialiser bug")

    with pytest.raises(RuntimeError):
        atomic_write(target, crashing)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_overwrite_replaces_the_file(fitted, tmp_path):
    path = tmp_path / "m.padim"
    path.write_bytes(b"old contents")
    fitted.save(path)
    assert read_model_file(path)[0]["format"] == "fastpadim"
    assert leftovers(tmp_path) == []
