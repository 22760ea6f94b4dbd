"""The model file: exact round trip, one clear error for each way a file can be wrong, atomic writes."""

from __future__ import annotations

import json
import os
import re

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
    expected_scores, expected_maps = fitted.score_images(test_arrays)
    scores, maps = loaded.score_images(test_arrays)
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
                                     "std": list(fitted.preset_.std), "squash": False}
    assert meta["grid"] == [16, 16] and meta["positions"] == 256 and meta["pool"] == 1 and meta["tiling"] is None
    assert meta["epsilon"] == 0.01 and meta["n_train_images"] == 12
    assert meta["threshold"]["image"] == fitted.threshold_ and meta["threshold"]["n_good_images"] == 4
    assert set(tensors) == {"mean", "scatter", "channel_indices"}  # statistics, not the factor (computed at load)


def test_every_saved_model_takes_more_images_after_load(train_arrays, test_arrays, tmp_path):
    model = Padim(**SMALL).fit(train_arrays[:8])
    model.save(tmp_path / "m.padim")
    loaded = Padim.load(tmp_path / "m.padim", device="cpu").partial_fit(train_arrays[8:])
    whole = Padim(**SMALL).fit(train_arrays)
    np.testing.assert_allclose(loaded.score_images(test_arrays)[0], whole.score_images(test_arrays)[0], rtol=1e-5)


def test_a_format_1_file_still_scores_but_takes_no_more_images(fitted, test_arrays, tmp_path):
    """Format 1 stored the factor itself (and the statistics only with --keep-stats)."""
    from fastpadim.modelfile import write_model_file

    meta = {**fitted.to_metadata(), "format_version": 1}
    for key in ("calibration", "history", "folds"):
        meta.pop(key)
    tensors = {"mean": fitted.mean_.cpu(), "whitener": fitted.whitener_.cpu(),
               "channel_indices": fitted.channel_indices_.cpu()}
    write_model_file(tmp_path / "v1.padim", meta, tensors)
    old = Padim.load(tmp_path / "v1.padim", device="cpu")
    np.testing.assert_array_equal(old.anomaly_scores(test_arrays), fitted.anomaly_scores(test_arrays))
    with pytest.raises(FastpadimError, match="no training statistics") as exc_info:
        old.partial_fit(test_arrays)
    assert "\n" not in str(exc_info.value)


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
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name != "scatter"}
    save_file(tensors, str(tmp_path / "lacking.padim"), metadata=metadata)
    with pytest.raises(FastpadimError, match="scatter"):
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
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


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

    with pytest.raises(FastpadimError, match="no space left"):
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


# ------------------------------------------------------------------------------ hostile model files
def rewrite(source, target, change_meta=None, change_tensors=None) -> None:
    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["fastpadim"])
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(target), metadata={"fastpadim": json.dumps(meta)})


def set_field(dotted: str, value):
    def change(meta):
        *parents, last = dotted.split(".")
        node = meta
        for key in parents:
            node = node[key]
        node[last] = value

    return change


@pytest.mark.parametrize("dotted, value", [
    ("threshold.image", float("nan")), ("threshold.image", float("inf")), ("preprocessing.std", [0.2, 0.0, 0.2]),
    ("preprocessing.image_size", 100000), ("backbone.n_features", "many"), ("epsilon", "x"), ("blur_sigma", -3),
    ("grid", [1, 1]), ("preprocessing.mean", [0.5, float("nan"), 0.5]), ("backbone.layers", "1,2,3"),
    ("positions", 257), ("pool", 0), ("tiling", {"tile": 8, "overlap": 0, "shared": False}),
    ("preprocessing.image_size", [64, 64, 64]), ("preprocessing.squash", "yes"),
    ("seed", -1), ("threshold.false_alarm_rate", 0), ("backbone.timm_name", "../../etc/passwd"), ("factor_dtype", "int8"),
])
def test_bad_metadata_is_refused_at_load_naming_the_field(saved, tmp_path, dotted, value):
    target = tmp_path / "bad.padim"
    rewrite(saved, target, change_meta=set_field(dotted, value))
    field = {"grid": "grid[0]", "tiling": "tiling.tile"}.get(dotted, dotted)
    with pytest.raises(FastpadimError, match=re.escape(f"field '{field}")):
        Padim.load(target, device="cpu")


@pytest.mark.parametrize("name", ["mean", "scatter"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_at_load(saved, tmp_path, name, value):
    target = tmp_path / "nan.padim"

    def poison(tensors):
        tensors[name].view(-1)[7] = value

    rewrite(saved, target, change_tensors=poison)
    with pytest.raises(FastpadimError, match=f"tensor '{name}' holds NaN or infinite values"):
        Padim.load(target, device="cpu")


def test_tensor_shapes_must_match_the_metadata(saved, tmp_path):
    target = tmp_path / "shape.padim"
    rewrite(saved, target, change_tensors=lambda t: t.update(mean=t["mean"][:-1].clone()))
    with pytest.raises(FastpadimError, match="tensor 'mean' has shape"):
        Padim.load(target, device="cpu")


def test_a_nan_score_is_never_a_verdict(fitted, test_arrays):
    """Even a model broken in memory (not through a file) gives an error per image, never "good"."""
    import copy

    broken = copy.deepcopy(fitted)
    broken.mean_ = broken.mean_.clone()
    broken.mean_[0, 0] = float("nan")
    prediction = broken.predict(test_arrays)
    assert len(prediction.scores) == 0 and len(prediction.skipped) == len(test_arrays)
    assert "non-finite score" in prediction.skipped[0][1]
    with pytest.raises(FastpadimError, match="finite number"):
        broken.threshold_ = float("nan")


def test_weights_path_in_metadata_is_never_followed(saved, tmp_path, monkeypatch):
    """A model file names weights by id only: a path in it is ignored, a file id needs the user's --weights."""
    secret = tmp_path / "secret.pth"
    torch.save({"x": torch.zeros(1)}, secret)
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    target = tmp_path / "foreign.padim"
    rewrite(saved, target, change_meta=lambda m: m["backbone"].update(
        weights_path=str(secret), weights_id="file:secret.pth:sha256=0123456789abcdef"))
    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(FastpadimError, match="pass its location with --weights"):
        Padim.load(target, device="cpu")
    assert str(secret) not in opened
    monkeypatch.undo()
    # the user's file must be the one the model was fitted with (same SHA-256)
    with pytest.raises(FastpadimError):
        Padim.load(target, device="cpu", weights=secret)


def test_a_model_file_never_sends_the_loader_to_the_hub(saved, tmp_path, monkeypatch):
    import timm

    calls = []
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        if pretrained:
            raise AssertionError("the network was asked for")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    target = tmp_path / "hub.padim"
    rewrite(saved, target, change_meta=lambda m: m["backbone"].update(weights_id="timm:resnet18.tv_in1k"))
    with pytest.raises(FastpadimError, match="allow a download"):
        Padim.load(target, device="cpu")
    assert not any(pretrained for _, pretrained in calls)


def test_a_model_file_cannot_make_us_build_a_giant_network(saved, tmp_path):
    target = tmp_path / "giant.padim"
    rewrite(saved, target, change_meta=lambda m: m["backbone"].update(
        name="vit_giant_patch14_224", timm_name="vit_giant_patch14_224", weights_id="timm:vit_giant_patch14_224"))
    with pytest.raises(FastpadimError, match="M parameters, above the limit"):
        Padim.load(target, device="cpu")


def test_interrupted_save_leaves_no_temporary(fitted, tmp_path):
    """SIGTERM while the model file is written: the process exits and removes its one temporary folder."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, time, torch
        import safetensors.torch as st
        from fastpadim.files import atomic_write
        real = st.save_file
        def slow(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            print("written", flush=True)
            time.sleep(30)
        atomic_write({str(tmp_path / 'm.padim')!r}, lambda tmp: slow({{"a": torch.zeros(1000)}}, tmp))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    assert any(p.name.startswith(".m.padim.") for p in tmp_path.iterdir())  # the temporary exists mid-write
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
