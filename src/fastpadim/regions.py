"""Defect regions: the connected parts of an anomaly map above the image threshold, as boxes in the frame's pixels.

An engineer at the line wants to know *where* a part is flagged, in the camera image's own coordinates: each region
is a bounding box (x, y, width, height: x to the right, y down, from the top-left pixel), its area in pixels and
its highest score. NumPy and SciPy only (no torch); SciPy is imported when regions are asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import FastpadimError

MAX_REGIONS = 100  # per image: a noisy map could split into thousands of specks, and a reply must stay small
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # pixels touching at a corner are one defect, not two


@dataclass(frozen=True)
class Region:
    """One connected defect: bounding box in frame pixels, area in pixels, highest anomaly score inside."""

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float


@dataclass(frozen=True)
class Regions:
    """An image's regions, highest peak first, at most ``limit``; ``left_out`` counts the weaker ones dropped."""

    regions: list[Region]
    left_out: int = 0

    def to_dict(self) -> dict:
        return {"regions": [asdict(r) for r in self.regions], "regions_left_out": self.left_out}


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError:  # the ONNX runtime install (fastpadim[runtime]) may lack SciPy
        raise FastpadimError("defect regions need SciPy, which is not installed: pip install scipy") from None
    return ndimage


def find_regions(frame_map: np.ndarray, threshold: float, limit: int = MAX_REGIONS) -> Regions:
    """The 8-connected regions of ``frame_map > threshold`` (the same pixels as ``visualize.defect_mask``)."""
    if limit < 0:
        raise FastpadimError(f"the region limit must be >= 0, got {limit}")
    ndimage = _ndimage()
    amap = np.asarray(frame_map, dtype=np.float32)
    labels, count = ndimage.label(amap > threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return Regions([])
    ids = np.arange(1, count + 1)
    peaks = np.asarray(ndimage.maximum(amap, labels, ids), dtype=np.float64)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = ndimage.find_objects(labels)
    # Highest peak first; equal peaks by size, then by label (reading order) so the order never depends on chance.
    order = np.lexsort((ids, -areas, -peaks))
    kept = [_region(boxes[i], int(areas[i]), float(peaks[i])) for i in order[:limit]]
    return Regions(kept, count - len(kept))


def _region(box: tuple[slice, slice], area: int, peak: float) -> Region:
    rows, cols = box
    return Region(x=cols.start, y=rows.start, width=cols.stop - cols.start, height=rows.stop - rows.start,
                  area=area, peak=peak)
