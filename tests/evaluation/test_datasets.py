from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastpadim.evaluation.datasets import find_categories, load_category, load_mask
from fastpadim.errors import FastpadimError
from fastpadim.images import Preprocessing
from fastpadim.evaluation.rd_mvtec import RD_CROP_SIZE, RdTransform


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def square_mask(size=64, box=(20, 30, 28, 40)):
    mask = np.zeros((size, size), np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    return mask


def make_category(root: Path, mask_style="mvtec", image_ext=".png", size=64) -> Path:
    gray = np.full((size, size, 3), 128, np.uint8)
    for i in range(3):
        save(root / "train" / "good" / f"{i:03d}{image_ext}", gray)
    save(root / "test" / "good" / f"000{image_ext}", gray)
    save(root / "test" / "scratch" / f"000{image_ext}", gray)
    if mask_style == "mvtec":
        save(root / "ground_truth" / "scratch" / "000_mask.png", square_mask(size))
    elif mask_style == "flat":
        save(root / "masks" / "000.png", square_mask(size))
    return root


def test_mvtec_layout_matches_masks_and_labels(tmp_path):
    category = load_category(make_category(tmp_path / "widget"))
    assert category.has_masks and category.name == "widget"
    assert len(category.train) == 3
    assert [t.defect_type for t in category.test] == ["good", "scratch"]
    assert category.labels.tolist() == [False, True]
    assert category.test[0].mask is None
    assert category.test[1].mask.name == "000_mask.png"


def test_user_layout_with_jpeg_images_and_flat_png_masks(tmp_path):
    category = load_category(make_category(tmp_path / "mine", mask_style="flat", image_ext=".jpg"))
    # The flat mask 000.png matches both test images named 000: the good one too (it is empty there).
    anomalous = [t for t in category.test if t.is_anomalous][0]
    assert anomalous.mask.name == "000.png" and anomalous.path.suffix == ".jpg"


def test_without_masks_only_image_metrics_and_it_says_so(tmp_path):
    category = load_category(make_category(tmp_path / "nomask", mask_style=None))
    assert not category.has_masks
    assert any("image-level metrics only" in note for note in category.notes)


def test_anomalous_image_without_its_mask_is_an_error(tmp_path):
    root = make_category(tmp_path / "c")
    save(root / "test" / "scratch" / "001.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(FastpadimError, match="001.png: anomalous test image without a mask"):
        load_category(root)


def test_mask_of_another_size_is_an_error(tmp_path):
    root = make_category(tmp_path / "c")
    save(root / "ground_truth" / "scratch" / "000_mask.png", square_mask(32))
    category = load_category(root)
    with pytest.raises(FastpadimError, match="mask is 32x32 but its image 000.png is 64x64"):
        load_mask(category.test[1], Preprocessing(64, None))


def test_one_class_test_set_is_stated(tmp_path):
    root = make_category(tmp_path / "c", mask_style=None)
    for path in (root / "test" / "scratch").iterdir():
        path.unlink()
    (root / "test" / "scratch").rmdir()
    category = load_category(root)
    assert any("all 1 test images are good" in note for note in category.notes)


def test_mask_goes_through_the_model_geometry(tmp_path):
    category = load_category(make_category(tmp_path / "c", size=64))
    mask = load_mask(category.test[1], Preprocessing(image_size=128, crop_size=96))
    assert mask.shape == (96, 96) and mask.dtype == bool
    # box rows 20..28, cols 30..40 at 64 px → ×2 at 128 px → minus the 16 px crop offset
    expected = np.zeros((96, 96), bool)
    expected[24:40, 44:64] = True
    assert np.array_equal(mask, expected)
    assert not load_mask(category.test[0], Preprocessing(128, 96)).any()


def test_mask_at_its_own_size_without_preprocessing(tmp_path):
    root = make_category(tmp_path / "c", size=64)
    save(root / "test" / "good" / "001.png", np.zeros((48, 80, 3), np.uint8))  # a frame of another shape
    category = load_category(root)
    mask = load_mask(category.test[2])
    assert mask.shape == (64, 64) and mask.sum() == 8 * 10  # the box as drawn, pixel for pixel
    # good images: all normal at the image's own (height, width), read from its header
    good = load_mask(category.test[1])
    assert good.shape == (48, 80) and not good.any()


def test_find_categories(tmp_path):
    make_category(tmp_path / "a")
    make_category(tmp_path / "b")
    assert [p.name for p in find_categories(tmp_path)] == ["a", "b"]
    assert [p.name for p in find_categories(tmp_path, ["b"])] == ["b"]
    assert [p.name for p in find_categories(tmp_path / "a")] == ["a"]
    with pytest.raises(FastpadimError, match="zzz"):
        find_categories(tmp_path, ["zzz"])


@pytest.mark.parametrize("index", range(6))
def test_rd_transform_keeps_defect_under_its_mask(index):
    # A red square on a gray textured background; its mask is exactly the square.
    rng = np.random.default_rng(index)
    image = rng.integers(90, 140, size=(256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    top, left = rng.integers(60, 150, size=2)
    image[top : top + 40, left : left + 40] = (255, 0, 0)
    mask[top : top + 40, left : left + 40] = 255
    transform = RdTransform(seed=7, split="test")
    angle, _, _ = transform.params(index)
    assert -10 < angle < 10
    out_image = transform.image(Image.fromarray(image), index)
    out_mask = transform.mask(Image.fromarray(mask), index)
    assert out_image.shape == (RD_CROP_SIZE, RD_CROP_SIZE, 3) and out_mask.shape == (RD_CROP_SIZE, RD_CROP_SIZE)
    red = (out_image[..., 0] > 200) & (out_image[..., 1] < 60)
    assert red.sum() > 500 and out_mask.sum() > 500
    # Away from the square's edge (where interpolation blends), red pixels and mask agree exactly.
    from scipy.ndimage import binary_erosion

    assert np.all(out_mask[binary_erosion(red, iterations=1)])
    assert np.all(red[binary_erosion(out_mask, iterations=2)])


def test_rd_transform_draws_vary_and_repeat():
    draws = {RdTransform(0, "train").params(i) for i in range(20)}
    assert len(draws) == 20
    assert RdTransform(3, "test").params(5) == RdTransform(3, "test").params(5)
    assert RdTransform(3, "test").params(5) != RdTransform(3, "train").params(5)
    angles = [RdTransform(s, "train").params(0)[0] for s in range(50)]
    assert min(angles) < -5 and max(angles) > 5
