"""Defect regions: connected parts of a frame map above the threshold, as boxes in the frame's pixels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fastpadim.errors import FastpadimError
from fastpadim.regions import MAX_REGIONS, Region, find_regions
from fastpadim.visualize import defect_mask


def two_blobs() -> np.ndarray:
    """A 40x60 map (height x width): a wide blob (peak 3) top left, a tall one (peak 5) right."""
    amap = np.zeros((40, 60), np.float32)
    amap[5:10, 10:20] = 2.0  # rows 5..9, columns 10..19: 5 high, 10 wide
    amap[7, 12] = 3.0
    amap[20:30, 40:45] = 5.0  # rows 20..29, columns 40..44: 10 high, 5 wide
    return amap


def test_two_blobs_are_two_regions_with_their_boxes_areas_and_peaks_highest_first():
    found = find_regions(two_blobs(), threshold=1.0)
    assert found.left_out == 0
    assert found.regions == [Region(x=40, y=20, width=5, height=10, area=50, peak=5.0),
                             Region(x=10, y=5, width=10, height=5, area=50, peak=3.0)]


def test_regions_cover_exactly_the_defect_mask():
    amap = np.random.default_rng(0).random((20, 30)).astype(np.float32)  # about 60 pixels above 0.9, in specks
    found = find_regions(amap, 0.9)
    mask = np.asarray(defect_mask(amap, 0.9)) > 0
    assert sum(r.area for r in found.regions) == mask.sum() and found.left_out == 0
    covered = np.zeros_like(mask)
    for r in found.regions:  # every box holds its peak; together they cover the mask
        assert amap[r.y:r.y + r.height, r.x:r.x + r.width].max() >= r.peak > 0.9
        covered[r.y:r.y + r.height, r.x:r.x + r.width] = True
    assert not (mask & ~covered).any()


def test_pixels_touching_at_a_corner_are_one_region():
    amap = np.zeros((10, 10), np.float32)
    amap[2, 2] = amap[3, 3] = amap[4, 4] = 1.0  # a diagonal line
    (region,) = find_regions(amap, 0.5).regions
    assert (region.x, region.y, region.width, region.height, region.area) == (2, 2, 3, 3, 3)


def test_a_map_at_or_below_the_threshold_has_no_regions():
    amap = np.full((32, 48), 0.5, np.float32)
    assert find_regions(amap, 0.5).to_dict() == {"regions": [], "regions_left_out": 0}


def test_the_count_is_bounded_and_says_how_many_were_left_out():
    amap = np.zeros((20, 200), np.float32)
    for i in range(60):  # 60 specks, apart, peaks 1..60
        amap[10, 3 * i] = float(i + 1)
    found = find_regions(amap, 0.5, limit=5)
    assert [r.peak for r in found.regions] == [60.0, 59.0, 58.0, 57.0, 56.0] and found.left_out == 55
    assert len(find_regions(np.ones((300, 300)) * np.indices((300, 300)).sum(0) % 2, 0.5).regions) <= MAX_REGIONS


def test_equal_peaks_are_ordered_by_size_then_reading_order():
    amap = np.zeros((20, 20), np.float32)
    amap[15, 15] = 2.0
    amap[1, 1] = 2.0
    amap[5:8, 5:8] = 2.0
    boxes = [(r.x, r.y, r.area) for r in find_regions(amap, 1.0).regions]
    assert boxes == [(5, 5, 9), (1, 1, 1), (15, 15, 1)]


def test_regions_are_plain_json():
    text = json.dumps(find_regions(two_blobs(), 1.0).to_dict())
    assert json.loads(text)["regions"][0] == {"x": 40, "y": 20, "width": 5, "height": 10, "area": 50, "peak": 5.0}


def test_without_scipy_the_refusal_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(FastpadimError, match="^defect regions need SciPy, which is not installed: pip install scipy$"):
        find_regions(two_blobs(), 1.0)
    with pytest.raises(FastpadimError, match="limit"):
        find_regions(two_blobs(), 1.0, limit=-1)


def test_regions_load_neither_torch_nor_scipy_on_import():
    code = "import sys, fastpadim.regions; print('torch' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
