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
    assert plan_module.CPU_FORWARD_IMAGES == model_module.CPU_FORWARD_IMAGES
    assert plan_module.UPDATE_BUFFER_BYTES == model_module.UPDATE_BUFFER_BYTES
    assert plan_module.CHUNK_ELEMENTS == gaussian._CHUNK_ELEMENTS
    assert plan_module.FACTOR_CHUNK_CAP == gaussian.FACTOR_CHUNK_CAP
    assert set(plan_module.FACTOR_BYTES) == set(model_module.FACTOR_DTYPES)


def test_shapes_alone_give_the_bottle_numbers():
    """64x64 positions x 176 channels (Lite0 at 256 px): the numbers docs/performance.md gives."""
    plan = plan_memory((64, 64), 176, "float32", keep_stats=False)
    assert plan.statistics == 4096 * 176 * 8 + 4096 * 15576 * 8  # 516 MB
    assert plan.factor == 4096 * 176 * 176 * 4  # 507 MB
    assert plan.factor_in_statistics and plan.factor <= plan.statistics
    half = plan_memory((64, 64), 176, "float16", keep_stats=False)
    assert half.factor * 2 == plan.factor and half.model_file < plan.model_file
    # on the CPU a half-precision factor is multiplied as a float32 copy: it does not lower the fit's peak
    assert half.compute_copy == plan.factor and half.peak > plan.peak
    kept = plan_memory((64, 64), 176, "float32", keep_stats=True)
    assert kept.model_file - plan.model_file == plan.statistics and kept.peak > plan.peak


@pytest.mark.parametrize("factor_dtype,keep_stats,shape", [
    ("float32", True, {}), ("float16", False, {}),
    ("float32", True, {"image_size": (48, 80), "squash": True}),  # rectangular
    ("float32", True, {"image_size": (64, 96), "squash": True, "tile": 48}),  # tiles, each with its Gaussians
    ("float32", True, {"image_size": (64, 96), "squash": True, "pool": 2}),
])
def test_planned_bytes_match_a_real_fit(train_arrays, tmp_path, factor_dtype, keep_stats, shape):
    model = Padim(**{**SMALL, "factor_dtype": factor_dtype, "keep_stats": keep_stats, **shape})
    plan = plan_for(model)
    model.fit(train_arrays[:8])
    assert plan.grid == tuple(model.grid_) and plan.dim == model.channel_indices_.numel()
    assert plan.positions == model.positions_ == model.mean_.shape[0]
    assert within(plan.factor, model.whitener_.nbytes)
    if keep_stats:
        measured = model.stats_.mean.nbytes + model.stats_.scatter.nbytes
        assert within(plan.statistics, measured)
    else:
        assert model.stats_ is None and plan.factor_in_statistics
        assert within(plan.compute_copy, model.whitener_.numel() * 4)  # the float32 copy scoring uses on the CPU
    path = tmp_path / "m.padim"
    model.save(path, keep_stats=keep_stats)
    assert within(plan.model_file, path.stat().st_size)


def test_a_plan_over_the_limit_refuses_with_the_levers():
    plan = plan_memory((64, 64), 176, "float32", keep_stats=True, baseline=800 * 10**6, available=1300 * 10**6)
    assert not plan.fits
    with pytest.raises(FastpadimError) as caught:
        check_plan(plan)
    message = str(caught.value)
    assert "\n" not in message
    assert "--n-features" in message and "--image-size" in message and "--keep-stats" in message
    assert "--factor-dtype float16" not in message  # it would not lower the peak on the CPU
    # every lever it names fits: the suggested channel count is the largest that does
    suggested = int(message.split("--n-features ")[1].split(":")[0])
    assert plan_memory((64, 64), suggested, "float32", True, baseline=800 * 10**6, available=1300 * 10**6).fits
    assert not plan_memory((64, 64), suggested + 1, "float32", True, baseline=800 * 10**6, available=1300 * 10**6).fits
    assert check_plan(plan_memory((64, 64), 176, available=10 * 10**9)).fits  # enough memory: no refusal


def test_unknown_available_memory_never_refuses():
    plan = plan_memory((64, 64), 176, available=None)
    assert plan.fits and "unknown" in plan.describe()


def test_the_description_is_one_line_with_the_numbers():
    line = plan_memory((64, 64), 176, available=23_500 * 10**6).describe()
    assert "\n" not in line and line.startswith("plan: 64x64 positions x 176 channels")
    assert "statistics 0.52 GB" in line and "factor 0.51 GB (float32" in line and "23.5 GB memory available" in line


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
    result = runner.invoke(app, ["fit", str(image_folder), "-o", str(target), *FAST, "--holdout", "0"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fitted"), result.stderr
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
