import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from PIL import Image

from fastpadim.evaluation import metrics
from fastpadim.evaluation.ablation import PcaPadim, SummedPadim
from fastpadim.cli import app
from fastpadim.evaluation.datasets import load_category
from fastpadim.evaluation.protocol import Settings, evaluate_category, inspected_box
from fastpadim.evaluation.synthetic import surface
from fastpadim.images import Preprocessing
from fastpadim.model import Padim
from fastpadim.evaluation.synthetic import make_dataset

from conftest import bottle_root  # noqa: E402

BOTTLE = bottle_root() or Path("absent-bottle-data")  # conftest: beside the checkout, $FASTPADIM_BOTTLE, /work/shared
SMALL = ["--weights", "random", "--n-features", "8", "--image-size", "64", "--crop-size", "0", "--device", "cpu", "--examples", "2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_dataset(root / "surface", n_train=8, n_test_good=3, n_test_defect=3, size=64, seed=0)
    return root


def test_evaluate_command_writes_all_outputs(data_root, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", str(data_root), "-o", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    row = report["categories"][0]
    assert row["category"] == "surface" and row["n_train"] == 8 and row["n_test"] == 9
    for key in ("image_auroc", "pixel_auroc", "pro", "image_f1_max", "pixel_f1_max"):
        assert 0.0 <= row[key] <= 1.0
    assert row["pro_bin_error_bound"] < 1e-3
    assert [s["category"] for s in report["summary"]] == ["mean all"]  # not an MVTec class name
    assert report["summary"][0]["pro"] == pytest.approx(row["pro"])
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("category,image_auroc") and len(csv_lines) == 3
    markdown = (out / "report.md").read_text()
    assert "surface/curves.png" in markdown and "surface/examples.png" in markdown
    assert (out / "surface" / "curves.png").stat().st_size > 1000
    assert (out / "surface" / "examples.png").stat().st_size > 1000


def test_broken_category_fails_alone_with_one_line(data_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root / "surface", root / "good_one")
    shutil.copytree(data_root / "surface", root / "broken")
    (root / "broken" / "ground_truth" / "spot" / "000_mask.png").unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", str(root), "-o", str(out), *SMALL])
    assert result.exit_code == 1
    assert "broken" in result.output and "without a mask" in result.output
    assert "Traceback" not in result.output
    report = json.loads((out / "results.json").read_text())
    assert [r["category"] for r in report["categories"]] == ["good_one"]
    assert "broken" in report["failed"]
    assert not (out / "broken").exists()


def test_no_masks_gives_image_metrics_only(data_root, tmp_path):
    root = tmp_path / "plain"
    shutil.copytree(data_root / "surface", root)
    shutil.rmtree(root / "ground_truth")
    run = evaluate_category(load_category(root), Settings(weights="random", n_features=8, image_size=64, crop_size=None, device="cpu"))
    assert run.metrics["image_auroc"] is not None
    assert run.metrics["pixel_auroc"] is None and run.metrics["pro"] is None
    assert any("image-level metrics only" in n for n in run.notes)


def test_rd_mvtec_runs_on_224_crops(data_root):
    run = evaluate_category(load_category(data_root / "surface"),
                            Settings(weights="random", n_features=8, device="cpu", rd_mvtec=True), seed=1, n_examples=1)
    assert run.examples[0].frame_map.shape == run.examples[0].mask.shape == (224, 224)
    assert run.metrics["pro"] is not None


def tiny_defect_category(root: Path) -> tuple[Path, int]:
    """Frames of 96x128 (height x width), twice the model's 48x64, with defects of 1 and 2 pixels that a mask
    brought down to the model's size would lose or distort. Returns the folder and the test frames' pixels."""
    rng = np.random.default_rng(0)
    for folder in ("train/good", "test/good", "test/dot", "ground_truth/dot"):
        (root / folder).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(surface(rng, 128)[:96]).save(root / "train" / "good" / f"{i}.png")
    Image.fromarray(surface(rng, 128)[:96]).save(root / "test" / "good" / "0.png")
    image, mask = surface(rng, 128)[:96], np.zeros((96, 128), np.uint8)
    # PIL's nearest neighbour at half size keeps the odd rows and columns: the dot at (40, 76) would vanish and
    # the 2-pixel defect on row 61 would shrink to 1 pixel
    mask[40, 76] = mask[61, 20:22] = 255
    image[mask > 0] = 0
    Image.fromarray(image).save(root / "test" / "dot" / "0.png")
    Image.fromarray(mask).save(root / "ground_truth" / "dot" / "0_mask.png")
    return root, 2 * 96 * 128


@pytest.mark.parametrize("crop", [None, (32, 48)])
def test_pixel_metrics_use_masks_at_their_own_size(tmp_path, monkeypatch, crop):
    root, frame_pixels = tiny_defect_category(tmp_path / "tiny")
    seen = []
    original = metrics.pixel_histograms
    monkeypatch.setattr(metrics, "pixel_histograms", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    settings = Settings(weights="random", n_features=8, image_size=(48, 64), crop_size=crop, device="cpu")
    run = evaluate_category(load_category(root), settings, n_examples=1)
    hist = seen[0]
    assert hist.positives.sum() == 3 and hist.n_regions == 2  # the mask's own count, both defects as drawn
    rows, cols = inspected_box(Preprocessing((48, 64), crop), (96, 128))
    inspected = (rows.stop - rows.start) * (cols.stop - cols.start) * 2
    assert hist.negatives.sum() == inspected - 3  # every inspected frame pixel, good frame included
    assert inspected == frame_pixels if crop is None else inspected < frame_pixels
    assert run.metrics["pixel_auroc"] is not None
    example = run.examples[-1]
    assert example.view.shape == (96, 128, 3) and example.frame_map.shape == example.mask.shape == (96, 128)


def test_inspected_box_is_the_crop_in_frame_pixels():
    whole = Preprocessing(256, None)
    assert inspected_box(whole, (900, 900)) == (slice(0, 900), slice(0, 900))
    cropped = Preprocessing(256, 224)
    assert inspected_box(cropped, (256, 256)) == (slice(16, 240), slice(16, 240))  # the crop box itself
    # 16 / 256 of 900 = 56.25: pixel 56's centre (56.5) is inside, pixel 843's (843.5 < 843.75) too
    assert inspected_box(cropped, (900, 900)) == (slice(56, 844), slice(56, 844))


def test_pca_reduction_projects_onto_orthonormal_components(data_root):
    train = sorted((data_root / "surface" / "train" / "good").iterdir())
    model = PcaPadim(weights="random", n_features=12, image_size=64, crop_size=None, device="cpu", holdout=0)
    model.fit(train)
    assert model.components_.shape[1] == 12 and model.mean_.shape[1] == 12
    gram = model.components_.T @ model.components_
    assert torch.allclose(gram, torch.eye(12), atol=1e-4)
    scores, maps = model.score_images(train[:2])
    assert maps.shape == (2, 64, 64) and np.all(np.isfinite(scores))


def test_summed_model_sums_the_single_layer_maps(data_root):
    images = sorted((data_root / "surface" / "train" / "good").iterdir())
    common = dict(weights="random", image_size=64, crop_size=None, device="cpu", holdout=0)
    summed = SummedPadim((1, 2), n_features=8, **common).fit(images)
    maps = [Padim(layers=(layer,), n_features=summed.members_[i].n_features, **common)
            .fit(images).score_images(images[:2])[1] for i, layer in enumerate((1, 2))]
    got = [r for batch in summed.iter_scored(images[:2], keep_view=True) for r in batch]
    assert np.allclose(got[0].anomaly_map, maps[0][0] + maps[1][0], atol=1e-4)
    assert got[0].frame_map.shape == got[0].view.shape[:2]
    assert np.allclose(got[0].frame_map, summed.preprocessing_.to_frame(got[0].anomaly_map, got[0].view.shape[:2]))
    assert got[1].score == pytest.approx(float((maps[0][1] + maps[1][1]).max()), rel=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"MVTec AD bottle not found ({BOTTLE})")
def test_bottle_end_to_end_with_real_weights():
    # A third of the training images keeps this test short; the full run is in docs/evaluation.md.
    category = load_category(BOTTLE)
    category.train = category.train[::3]
    run = evaluate_category(category, Settings(device="cpu", crop_size=None), n_examples=1)
    assert run.n_test == 83
    assert run.metrics["image_auroc"] >= 0.97
    assert run.metrics["pixel_auroc"] >= 0.96
    assert run.metrics["pro"] >= 0.85
