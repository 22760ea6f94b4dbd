"""``fastpadim demo`` end to end, and the generated data set it runs on."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fastpadim import Padim
from fastpadim.cli import app
from fastpadim.evaluation.synthetic import make_dataset, surface


def test_generated_data_set_layout_and_masks(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=3, n_test_good=2, n_test_defect=2, size=64, seed=1)
    assert len(list((root / "train/good").glob("*.png"))) == 3
    for kind in ("scratch", "spot"):
        for image_path in sorted((root / "test" / kind).glob("*.png")):
            mask = np.asarray(Image.open(root / "ground_truth" / kind / f"{image_path.stem}_mask.png")) > 0
            assert mask.any() and mask.mean() < 0.2  # a defect, not the whole image
    again = make_dataset(tmp_path / "e", n_train=3, n_test_good=2, n_test_defect=2, size=64, seed=1)
    assert (root / "test/spot/000.png").read_bytes() == (again / "test/spot/000.png").read_bytes()  # seeded


@pytest.mark.parametrize("size", [64, 128, 256])
def test_surfaces_are_textured_at_any_size(size):
    """Regression: a fixed shading blur saturated small surfaces to plain black or white."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        image = surface(rng, size)
        assert image.shape == (size, size, 3)
        assert ((image == 0) | (image == 255)).mean() < 0.01
        assert 60 < image.mean() < 200 and image.std() > 2


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for text in ("# fastpadim demo report", "image AUROC", "pixel AUROC", "efficientnet_lite0", "pypi:"):
        assert text in report
    image_auroc = float(re.search(r"\| image AUROC \| ([0-9.]+) \|", report).group(1))
    pixel_auroc = float(re.search(r"\| pixel AUROC \| ([0-9.]+) \|", report).group(1))
    assert image_auroc >= 0.9 and pixel_auroc >= 0.9, report[:600]
    tests = sorted((out / "data/test").rglob("*.png"))
    assert len(tests) == 36
    for path in tests:
        kind = path.parent.name
        assert (out / "heatmaps" / kind / f"{path.stem}.png").is_file()
        assert (out / "heatmaps" / kind / f"{path.stem}_mask.png").is_file()
    assert report.count("| anomalous |") + report.count("| good |") == 36
    model = Padim.load(out / "demo.padim", device="cpu")
    assert model.threshold_ is not None and model.n_samples_seen_ == 60  # none held out (leave-one-out scores)
    assert model.calibration_.method == "out-of-fold" and model.calibration_.n == 60
