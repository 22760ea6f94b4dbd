"""The memory plan: planned bytes against the tensors a real fit allocates and the file it writes; a plan over
the limit refuses in one line before any image is read; ``fit --plan`` prints the plan and writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import SMALL
from typer.testing import CliRunner

from fastpadim import Padim, gaussian
from fastpadim import model as model_module
from fastpadim import plan as plan_module
from fastpadim.cli import app
from fastpadim.errors import FastpadimError
from fastpadim.plan import check_plan, plan_for, plan_memory

FAST = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--crop-size", "0", "--device", "cpu"]
runner = CliRunner()


def within(planned: int, measured: int, tolerance: float = 0.10) -> bool:
    return abs(planned - measured) <= tolerance * measured


def test_the_plan_keeps_the_engines_constants():
    """The plan repeats the engine's buffer and chunk sizes (so it needs no torch for arithmetic)."""
    from fastpadim.cli import options

    assert plan_module.CPU_FORWARD_IMAGES == model_module.CPU_FORWARD_IMAGES
    assert plan_module.UPDATE_BUFFER_BYTES == gaussian.UPDATE_BUFFER_BYTES
    assert plan_module.FOLD_CACHE_BYTES == model_module.FOLD_CACHE_BYTES
    assert plan_module.CHUNK_ELEMENTS == gaussian._CHUNK_ELEMENTS
    assert plan_module.FACTOR_CHUNK_CAP == gaussian.FACTOR_CHUNK_CAP
    assert set(plan_module.FACTOR_BYTES) == set(model_module.FACTOR_DTYPES)
    assert options.MAX_FOLDS == model_module.MAX_FOLDS  # --folds is checked before torch is imported


def test_shapes_alone_give_the_bottle_numbers():
    """64x64 positions x 176 channels (Lite0 at 256 px), bottle's 209 images: the numbers docs/performance.md gives."""
    plan = plan_memory((64, 64), 176, "float32", folds=5, images=209)
    assert plan.statistics == 4096 * 176 * 8 + 4096 * 15576 * 8  # 516 MB
    assert plan.compacted == 4096 * 176 * 8 + 4096 * 15576 * 4  # float64 mean, float32 packed scatter
    assert plan.factor == 4096 * 176 * 176 * 4  # 507 MB
    # the file: float32 mean and packed scatter (no factor), channel indices, the header
    assert plan.model_file == 4096 * 176 * 4 + 4096 * 15576 * 4 + 176 * 8 + plan_module.FILE_HEADER_BYTES
    # the out-of-fold pass sets the peak: the statistics, one fold's statistics (then the factor in their memory)
    # and the fold's 42 images' embeddings
    assert plan.phase == "out-of-fold" and plan.fold_cache == 42 * 4096 * 176 * 4
    assert plan.need >= 2 * plan.statistics + plan.fold_cache
    # leave-one-out in closed form (the default), --folds 0, a hold-out or threshold images save about one
    # float64 statistics: a scoring pass with the fitted model, no fold statistics
    for folds in ("all", 0):
        none = plan_memory((64, 64), 176, "float32", folds=folds, images=209)
        assert none.phase != "out-of-fold" and none.fold_cache == 0
        assert 0.7 * plan.statistics <= plan.peak - none.peak <= plan.statistics + plan.fold_cache
    # with the images unknown, a fold's cache is taken at its bound; a large fold is embedded again, not kept
    assert plan_memory((64, 64), 176, folds=5).fold_cache >= plan_module.FOLD_CACHE_BYTES
    assert plan_memory((64, 64), 176, folds=5, images=10**6).fold_cache < plan_module.FOLD_CACHE_BYTES * 1.1
    half = plan_memory((64, 64), 176, "float16", folds=5, images=209)
    assert half.factor * 2 == plan.factor and half.model_file == plan.model_file  # the file holds no factor
    # on the CPU a half-precision factor is multiplied as a float32 copy: it does not lower the fit's peak
    assert half.compute_copy == plan.factor and half.peak > plan.peak


class Spy:
    """What a real fit allocates: the float64 statistics when they are compacted, each fold's cached embeddings."""

    def __init__(self, monkeypatch):
        self.statistics: list[int] = []
        self.caches: list[int] = []
        compacted, fold_statistics = gaussian.GaussianStats.compacted, Padim._fold_statistics

        def spy_compacted(stats):
            self.statistics.append(stats.mean.nbytes + stats.scatter.nbytes)
            return compacted(stats)

        def spy_fold_statistics(model, images):
            stats, cached = fold_statistics(model, images)
            self.caches.append(sum(e.nbytes for e, _ in cached or []))
            return stats, cached

        monkeypatch.setattr(gaussian.GaussianStats, "compacted", spy_compacted)
        monkeypatch.setattr(Padim, "_fold_statistics", spy_fold_statistics)


@pytest.mark.parametrize("factor_dtype,folds,shape", [
    ("float32", 2, {}), ("float32", "all", {}), ("float16", 0, {}), ("float16", 4, {}),
    ("float32", 2, {"image_size": (48, 80), "squash": True}),  # rectangular
    ("float32", 2, {"image_size": (64, 96), "squash": True, "tile": 48}),  # tiles, each with its Gaussians
    ("float32", 0, {"image_size": (64, 96), "squash": True, "pool": 2}),
])
def test_planned_bytes_match_a_real_fit(train_arrays, tmp_path, monkeypatch, factor_dtype, folds, shape):
    model = Padim(**{**SMALL, "factor_dtype": factor_dtype, "folds": folds, **shape})
    images = train_arrays[:8]
    plan = plan_for(model, images=len(images))
    spy = Spy(monkeypatch)
    assert plan.phase != "out-of-fold" or folds not in (0, "all")
    model.fit(images)
    assert plan.grid == tuple(model.grid_) and plan.dim == model.channel_indices_.numel()
    assert plan.positions == model.positions_ == model.mean_.shape[0]
    assert plan.folds == folds and (model.threshold_ is not None) == (folds != 0)
    assert within(plan.factor, model.whitener_.nbytes)
    assert len(spy.statistics) == 1 and within(plan.statistics, spy.statistics[0])  # float64, before compaction
    assert within(plan.compacted, model.stats_.mean.nbytes + model.stats_.scatter.nbytes)  # what the model keeps
    compute = model._whitener_compute
    assert plan.compute_copy == (compute.nbytes if compute is not model.whitener_ else 0)
    # each fold's embeddings are kept for its scoring: the plan sizes the cache from the largest fold
    assert len(spy.caches) == (0 if folds == "all" else folds)
    if spy.caches:
        assert within(plan.fold_cache, max(spy.caches), tolerance=0.15)
    path = tmp_path / "m.padim"
    model.save(path)
    assert within(plan.model_file, path.stat().st_size)


# A fit whose state dominates the process (1024 positions x 256 channels: 0.27 GB of float64 statistics, twice that
# at the out-of-fold pass), in a fresh interpreter: the plan's peak against the measured peak RSS.
PEAK_SCRIPT = """
import json, sys
import numpy as np
from fastpadim import Padim
from fastpadim.plan import plan_for
rng = np.random.default_rng(0)
images = [(rng.integers(90, 170, (128, 128, 3))).astype(np.uint8) for _ in range(12)]
model = Padim(backbone="resnet18", weights="random", image_size=128, n_features=256, device="cpu", workers=1,
              folds=sys.argv[1] if sys.argv[1] == "all" else int(sys.argv[1]), batch_size=8)
plan = plan_for(model, images=len(images))
model.fit(images)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
model.save(sys.argv[2])
print(json.dumps({"planned": plan.peak, "baseline": plan.baseline, "phase": plan.phase, "measured": int(hwm.split()[1]) * 1024}))
"""


@pytest.mark.parametrize("folds", [3, "all"])
def test_the_planned_peak_matches_a_real_fits_peak_rss(tmp_path, folds):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, TEST_THREADS

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(TEST_THREADS), "MKL_NUM_THREADS": str(TEST_THREADS)}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folds), str(tmp_path / "m.padim")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"folds {folds}: planned peak {result['planned'] / 1e9:.3f} GB, measured {result['measured'] / 1e9:.3f} GB "
          f"(baseline {result['baseline'] / 1e9:.3f} GB, at {result['phase']})")
    assert result["phase"] == "out-of-fold" if folds == 3 else result["phase"] in ("finish", "threshold")
    # the whole peak within 10 %, and what the fit adds to the process within 20 %
    assert within(result["planned"], result["measured"]), result
    assert within(result["planned"] - result["baseline"], result["measured"] - result["baseline"], 0.20), result


def test_a_plan_over_the_limit_refuses_with_the_levers():
    plan = plan_memory((64, 64), 176, "float32", folds=5, images=209, baseline=800 * 10**6, available=1300 * 10**6)
    assert not plan.fits
    with pytest.raises(FastpadimError) as caught:
        check_plan(plan)
    message = str(caught.value)
    assert "\n" not in message
    assert "--n-features" in message and "--image-size" in message and "--folds all" in message
    assert "--factor-dtype float16" not in message  # it would not lower the peak on the CPU
    # every lever it names fits: the suggested channel count is the largest that does
    suggested = int(message.split("--n-features ")[1].split(":")[0])
    machine = dict(images=209, baseline=800 * 10**6, available=1300 * 10**6)
    assert plan_memory((64, 64), suggested, "float32", 5, **machine).fits
    assert not plan_memory((64, 64), suggested + 1, "float32", 5, **machine).fits
    assert plan_memory((64, 64), 176, "float32", "all", **machine).fits  # --folds all
    assert check_plan(plan_memory((64, 64), 176, available=10 * 10**9)).fits  # enough memory: no refusal
    # without fold models there is no --folds lever to name
    for folds in (0, "all"):
        with pytest.raises(FastpadimError) as caught:
            check_plan(plan_memory((64, 64), 176, "float32", folds, images=209, baseline=800 * 10**6,
                                   available=900 * 10**6))
        assert "--folds" not in str(caught.value)


def test_unknown_available_memory_never_refuses():
    plan = plan_memory((64, 64), 176, available=None)
    assert plan.fits and "unknown" in plan.describe()


def test_the_description_is_one_line_with_the_numbers():
    line = plan_memory((64, 64), 176, folds=5, images=209, available=23_500 * 10**6).describe()
    assert "\n" not in line and line.startswith("plan: 64x64 positions x 176 channels")
    assert "statistics 0.52 GB" in line and "factor 0.51 GB (float32)" in line and "model file 0.26 GB" in line
    assert "at out-of-fold, 5 folds)" in line and "23.5 GB memory available" in line
    assert "at out-of-fold" not in plan_memory((64, 64), 176).describe()  # leave-one-out: no fold models


def test_available_memory_reads_meminfo():
    available = plan_module.available_memory()
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo here")
    assert available is not None and available > 0


# ------------------------------------------------------------------------------------------------ command line
def test_fit_plan_prints_the_plan_and_writes_nothing(image_folder, tmp_path):
    target = tmp_path / "m.padim"
    result = runner.invoke(app, ["fit", str(image_folder), "-o", str(target), *FAST, "--plan"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("input 64x64 (height x width); grid 16x16"), result.output
    assert lines[1].startswith("plan: 16x16 positions x 100 channels"), result.output
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_fit_that_fits_says_only_its_result(image_folder, tmp_path, monkeypatch):
    """The plan is checked on every fit, but one that fits keeps fit's one result line (one line per message)."""
    checked = []
    original = plan_module.available_memory
    monkeypatch.setattr(plan_module, "available_memory", lambda: checked.append(1) or original())
    target = tmp_path / "m.padim"
    # (a rate 16 good scores support: a lower one would add the warning that they cannot show it)
    result = runner.invoke(app, ["fit", str(image_folder), "-o", str(target), *FAST, "--false-alarm-rate", "0.1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fitted"), result.stderr
    assert "; threshold " in lines[0] and "(out-of-fold, leave-one-out, 16 good scores, false-alarm rate 0.1)" in lines[0]
    assert checked and target.exists()


def test_fit_over_the_limit_refuses_before_any_image_is_read(tmp_path, monkeypatch):
    """The source holds only files no decoder reads: had the fit read them, it would fail on too few readable
    images; refused by the plan, it says only the memory line."""
    source = tmp_path / "corrupt"
    source.mkdir()
    for i in range(4):
        (source / f"{i}.png").write_bytes(b"not an image")
    monkeypatch.setattr(plan_module, "available_memory", lambda: 1_000_000)  # 1 MB free
    target = tmp_path / "m.padim"
    result = runner.invoke(app, ["fit", str(source), "-o", str(target), *FAST])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: this fit needs about"), result.stderr
    assert "16x16 positions x 100 channels" in lines[0] and "no smaller setting fits" in lines[0]
    assert not target.exists()
    # the same folder without the limit: the images are read (and refused), so the test above can fail
    monkeypatch.undo()
    result = runner.invoke(app, ["fit", str(source), "-o", str(target), *FAST])
    assert result.exit_code == 1 and "unreadable" in result.stderr and "this fit needs" not in result.stderr


def test_a_memory_limit_refuses_a_plan_above_it_with_levers_below_it():
    plan = plan_memory((240, 320), 176, "float32", image_size=(960, 1280), baseline=800 * 10**6,
                       available=100 * 10**9, limit=10 * 10**9)
    assert plan.peak > plan.limit and not plan.fits
    with pytest.raises(FastpadimError, match=r"above the --max-memory limit of 10.0 GB; try fewer channels") as info:
        check_plan(plan)
    message = str(info.value)
    assert "\n" not in message and "--pool 2" in message and "--image-size" in message
    within_limit = plan_memory((120, 160), 176, "float32", image_size=(960, 1280), baseline=800 * 10**6,
                               available=100 * 10**9, limit=10 * 10**9)
    assert within_limit.fits  # pooling 2x2: a quarter of the positions


def test_fit_max_memory_refuses_before_any_image_is_read(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 90 + i, np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not an image")  # would be skipped with a line, if any image were read
    target = tmp_path / "m.padim"
    result = runner.invoke(app, ["fit", str(folder), "-o", str(target), *FAST, "--image-size", "48x64",
                                 "--max-memory", "0.5"])
    assert result.exit_code != 0 and not target.exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "above the --max-memory limit of 0.50 GB" in lines[0], result.stderr
