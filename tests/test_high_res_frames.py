"""The high-resolution frame generator (benchmarks/high_res_frames.py) on tiny synthetic sources: frame sizes,
exact masks, defects on the object, determinism, and the layout fastpadim's evaluation reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastpadim.evaluation.datasets import load_category

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "high_res_frames.py"
SIZE = (96, 128)


def _load_generator():
    spec = importlib.util.spec_from_file_location("high_res_frames", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hrf = _load_generator()


def _source(path: Path, seed: int) -> None:
    """A bottle-like 64x64 image: a dark textured disc (radius 0.46) on white."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:64, :64]
    disc = (ys - 31.5) ** 2 + (xs - 31.5) ** 2 <= (0.46 * 64) ** 2
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    image[disc] = rng.integers(40, 120, size=(int(disc.sum()), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires")
    source = root / "source"
    for i in range(3):
        _source(source / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        _source(source / "test" / "good" / f"{i:03d}.png", 100 + i)
    out = root / "frames"
    manifest = hrf.make_frames(source, out, size=SIZE, seed=3, n_defective_per_kind=3)
    return source, out, manifest


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_layout_is_what_evaluation_reads(generated):
    _, out, manifest = generated
    category = load_category(out)
    assert len(category.train) == 3 and category.has_masks
    kinds = sorted({item.defect_type for item in category.test})
    assert kinds == sorted(["good", *hrf.KINDS])
    assert sum(item.is_anomalous for item in category.test) == 3 * len(hrf.KINDS)
    assert all((item.mask is not None) == item.is_anomalous for item in category.test)
    assert manifest["size_hw"] == list(SIZE) and len(manifest["frames"]) == 3 * len(hrf.KINDS)


def test_sizes_and_canvas(generated):
    source, out, _ = generated
    for path in sorted(out.rglob("*.png")):
        assert _read(path).shape[:2] == SIZE, path
    frame = _read(out / "train" / "good" / "000.png")
    assert frame.shape == (*SIZE, 3)
    assert (frame[:, :8] == 255).all() and (frame[:, -8:] == 255).all()  # the canvas beside the square object
    expected = hrf.frame_from(source / "train" / "good" / "000.png", SIZE)
    assert np.array_equal(frame, expected)


def test_masks_are_exactly_the_painted_pixels_on_the_object(generated):
    _, out, manifest = generated
    oy, ox, radius = hrf.object_region(SIZE)
    ys, xs = np.mgrid[:SIZE[0], :SIZE[1]]
    on_object = (ys - oy) ** 2 + (xs - ox) ** 2 <= radius ** 2
    for key, record in manifest["frames"].items():
        kind, name = key.split("/")
        clean = _read(out / "test" / "good" / record["source"])
        frame = _read(out / "test" / kind / f"{name}.png")
        mask = _read(out / "ground_truth" / kind / f"{name}_mask.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}, key
        differs = (frame != clean).any(axis=2)
        assert np.array_equal(differs, mask > 0), key
        assert on_object[mask > 0].all(), key
        assert (clean[mask > 0].mean(axis=1) < 200).all(), key  # on the dark object, not on the white canvas
        change = np.abs(frame.astype(int) - clean.astype(int))[mask > 0].max(axis=1)
        assert change.max() <= hrf.CONTRAST[1], key
        assert sum(d["pixels"] for d in record["defects"]) == int((mask > 0).sum()), key
        assert hrf.DEFECTS_PER_FRAME[0] <= len(record["defects"]) <= hrf.DEFECTS_PER_FRAME[1]
        for defect in record["defects"]:
            assert hrf.CONTRAST[0] <= abs(defect["contrast"]) <= hrf.CONTRAST[1]
            if kind == "spot":
                assert hrf.SPOT_DIAMETER[0] <= defect["diameter_px"] <= hrf.SPOT_DIAMETER[1]
                assert defect["pixels"] <= 36
            if kind == "scratch":
                assert hrf.SCRATCH_WIDTH[0] <= defect["width_px"] <= hrf.SCRATCH_WIDTH[1]


def test_deterministic_from_the_seed(generated, tmp_path):
    source, out, manifest = generated
    again = hrf.make_frames(source, tmp_path / "again", size=SIZE, seed=3, n_defective_per_kind=3)
    assert json.dumps(again["frames"]) == json.dumps(manifest["frames"])
    for kind in hrf.KINDS:
        assert np.array_equal(_read(tmp_path / "again" / "test" / kind / "001.png"),
                              _read(out / "test" / kind / "001.png"))
    other = hrf.make_frames(source, tmp_path / "other", size=SIZE, seed=4, n_defective_per_kind=3)
    assert json.dumps(other["frames"]) != json.dumps(manifest["frames"])


def test_shapes():
    ys, xs = hrf._disc(10, 10, 3)
    assert ys.size == 9
    ys, xs = hrf._disc(10.5, 10.5, 4)
    assert ys.size == 12
    ys, xs = hrf._segment(5, 5, 5, 45, 1)  # horizontal, 1 px wide: one row
    assert set(ys.tolist()) == {5} and xs.min() == 5 and xs.max() == 45
    ys, xs = hrf._segment(5.3, 5, 5.3, 45, 2)  # 2 px wide: two rows
    assert set(ys.tolist()) == {5, 6} and ys.size == 2 * 41
    # every column (or row) of a line crosses it 1 or 2 px thick; off the diagonals, where either axis is main
    for angle in np.linspace(0, np.pi, 13) + 0.1:
        for width in (1, 2):
            dy, dx = 30 * np.sin(angle), 30 * np.cos(angle)
            ys, xs = hrf._segment(50 - dy, 50 - dx, 50 + dy, 50 + dx, width)
            main = xs if abs(dx) >= abs(dy) else ys
            assert (np.bincount(main - main.min()) == width).all(), (angle, width)
    assert hrf.parse_size("960x1280") == (960, 1280) and hrf.parse_size("512") == (512, 512)
