"""Rectangular inputs, pooling and tiles: shapes end to end, stitching without seams, frames never squashed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL, make_surfaces, with_spot

from fastpadim import Padim
from fastpadim.errors import FastpadimError
from fastpadim.images import Preprocessing
from fastpadim.sizes import as_size, for_long_side, parse_size, round_to
from fastpadim.tiles import Tiler, tile_origins

RECT = {**SMALL, "image_size": (48, 80)}


def frames(n: int, size=(48, 80), seed: int = 0) -> list[np.ndarray]:
    """Rectangular textured frames: crops of larger generated surfaces."""
    return [s[: size[0], : size[1]] for s in make_surfaces(n, max(size), seed)]


def test_sizes_parse_as_height_by_width():
    assert parse_size("960x1280") == (960, 1280) and parse_size("256") == (256, 256)
    assert as_size(64) == (64, 64) and as_size([48, 80]) == (48, 80)
    assert round_to((230, 300), 16) == (224, 304) and round_to((5, 40), 16) == (16, 48)
    assert for_long_side(1280, (2048, 2448)) == (1071, 1280)
    for bad in ("12x", "x12", "-5", "1.5x3", ""):
        with pytest.raises(FastpadimError, match="HxW"):
            parse_size(bad)


@pytest.mark.parametrize("length,tile,overlap", [(96, 64, 16), (240, 128, 32), (128, 128, 0), (100, 200, 0)])
def test_tile_origins_cover_the_side_on_a_fixed_step(length, tile, overlap):
    origins = tile_origins(length, tile, overlap, 16)
    assert origins[0] == 0 and origins[-1] + min(tile, length) >= length
    assert all(o % 16 == 0 for o in origins)
    assert all(b - a <= tile - overlap for a, b in zip(origins, origins[1:]))  # overlap at least as asked


def test_stitching_equal_tiles_gives_an_equal_map_without_seams():
    tiler = Tiler((96, 160), 64, 16, 16, 4)
    assert tiler.n_tiles > 4 and tiler.grid == (24, 40)
    maps = torch.full((2, tiler.n_tiles, *tiler.tile_grid), 3.25)
    stitched = tiler.stitch(maps)
    assert stitched.shape == (2, 24, 40) and torch.allclose(stitched, torch.tensor(3.25))


def test_stitching_puts_each_tile_where_it_was_cut():
    tiler = Tiler((64, 128), 64, 0, 16, 4)  # two tiles side by side, no overlap
    images = torch.arange(2 * 3 * 64 * 128, dtype=torch.float32).reshape(2, 3, 64, 128)
    tiles = tiler.split(images)
    assert tiles.shape == (4, 3, 64, 64) and torch.equal(tiles[1], images[0, :, :, 64:])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(2, 2, 1, 1).expand(2, 2, 16, 16)
    stitched = tiler.stitch(values)
    assert torch.equal(stitched[0, :, :16], torch.ones(16, 16)) and torch.equal(stitched[1, :, 16:], torch.full((16, 16), 4.0))


def test_a_rectangular_model_keeps_its_shape_through_save_and_load(tmp_path):
    train = frames(8)
    model = Padim(**RECT).fit(train)
    assert model.preprocessing_.output_size == (48, 80) and model.grid_ == (12, 20) and model.positions_ == 240
    scores, maps = model.score_images(train[:2] + [with_spot(train[2])])
    assert maps.shape == (3, 48, 80) and scores[2] > scores[:2].max()
    model.save(tmp_path / "m.padim")
    loaded = Padim.load(tmp_path / "m.padim", device="cpu")
    assert loaded.preprocessing_.output_size == (48, 80)
    np.testing.assert_allclose(loaded.score_images(train[:2])[0], scores[:2], rtol=1e-5)


def test_maps_come_back_in_the_frame_pixels():
    """A frame twice the model's size (same shape): its frame map and view are at the frame's size."""
    model = Padim(**RECT).fit(frames(6))
    big = frames(1, (96, 160), seed=5)[0]
    [result] = next(model.iter_scored([big], keep_view=True))
    assert result.anomaly_map.shape == (48, 80) and result.view.shape[:2] == result.frame_map.shape == (96, 160)
    assert np.isclose(result.frame_map.max(), result.score, rtol=0.05)


def test_the_crop_is_put_back_where_it_was_cut():
    pre = Preprocessing((64, 96), (32, 48))
    back = pre.to_frame(np.ones((32, 48), np.float32), (64, 96))
    assert back.shape == (64, 96) and back[16:48, 24:72].min() == 1 and back[:16].max() == 0


def test_a_frame_of_another_shape_is_refused_not_squashed():
    model = Padim(**RECT).fit(frames(6))
    square = make_surfaces(1, 64, seed=9)[0]
    [result] = next(model.iter_scored([square]))
    assert result.score is None and "would be squashed" in result.error and "--squash" in result.error
    squashing = Padim(**{**RECT, "squash": True}).fit(frames(6))
    [result] = next(squashing.iter_scored([square]))
    assert result.error is None and result.anomaly_map.shape == (48, 80)


def test_sizes_are_rounded_to_the_stride():
    model = Padim(**{**SMALL, "image_size": (50, 90), "squash": True}).prepare()
    assert model.preprocessing_.output_size == (48, 96)  # multiples of resnet18's layer3 stride, 16


def test_pooling_divides_the_positions():
    model = Padim(**{**RECT, "pool": 2}).fit(frames(6))
    assert model.grid_ == (6, 10) and model.mean_.shape[0] == 60
    assert model.score_images(frames(1, seed=3))[1].shape == (1, 48, 80)


def test_tiles_keep_a_gaussian_per_tile_position(tmp_path):
    train = frames(8, (64, 96))
    model = Padim(**{**SMALL, "image_size": (64, 96), "tile": 48, "tile_overlap": 16}).fit(train)
    tiles = model.tiler_.n_tiles
    assert tiles == 6 and model.positions_ == tiles * 12 * 12 and model.grid_ == (16, 24)
    scores, maps = model.score_images(train[:2] + [with_spot(train[2])])
    assert maps.shape == (3, 64, 96) and scores[2] > scores[:2].max()
    model.save(tmp_path / "t.padim")
    np.testing.assert_allclose(Padim.load(tmp_path / "t.padim", device="cpu").score_images(train[:2])[0],
                               scores[:2], rtol=1e-5)
    shared = Padim(**{**SMALL, "image_size": (64, 96), "tile": 48, "tile_shared": True}).fit(train)
    assert shared.positions_ == 144 and shared.n_samples_seen_ == 8  # images, not tiles
    assert shared.stats_.count == 8 * shared.tiler_.n_tiles


def test_a_tile_as_large_as_the_frame_is_the_untiled_model():
    train = frames(6)
    plain = Padim(**RECT).fit(train)
    tiled = Padim(**{**RECT, "tile": 96}).fit(train)
    assert tiled.tiler_.n_tiles == 1
    np.testing.assert_allclose(tiled.score_images(train[:2])[1], plain.score_images(train[:2])[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad,match", [
    ({"pool": 0}, "pool"), ({"tile": 8}, "tile"), ({"tile": 64, "tile_overlap": 64}, "tile_overlap"),
    ({"image_size": (64, 100000)}, "image_size"), ({"image_size": "64x"}, "HxW"), ({"squash": "yes"}, "squash"),
])
def test_bad_shape_parameters_are_one_line(bad, match):
    with pytest.raises(FastpadimError, match=match):
        Padim(**{**SMALL, **bad}).prepare()


def test_fit_long_side_keeps_the_frames_aspect_and_skips_other_shapes(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from fastpadim.cli import app

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames(6, (96, 128))):
        Image.fromarray(frame).save(folder / f"{i}.png")
    Image.fromarray(make_surfaces(1, 96, seed=7)[0]).save(folder / "square.png")  # another shape: skipped, said
    target = tmp_path / "m.padim"
    result = CliRunner().invoke(app, ["fit", str(folder), "-o", str(target), "--backbone", "resnet18", "--weights",
                                      "random", "--device", "cpu", "--holdout", "0", "--long-side", "64"])
    assert result.exit_code == 0, result.output
    assert "input 48x64 (height x width)" in result.stderr
    assert "square.png: 96x96 (width x height) would be squashed" in result.stderr
    model = Padim.load(target, device="cpu")
    assert model.preprocessing_.output_size == (48, 64) and model.n_samples_seen_ == 6
