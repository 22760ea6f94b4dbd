"""Heatmap overlays and binary defect masks for people to look at, in the pixels of the image they are given: with
the frame and its ``frame_map`` (``ScoredImage.view`` and ``.frame_map``) they lie over the camera image as it is."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _colormap() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


_LUT: np.ndarray | None = None


def normalize_map(anomaly_map: np.ndarray, threshold: float | None) -> np.ndarray:
    """Map scores to 0..1 on a fixed scale: the threshold sits at the middle, so good images stay cool.

    Without a threshold the map's own range is used (then every image shows some "hot" spot).
    """
    if threshold is not None and threshold > 0:
        return np.clip(anomaly_map / (2.0 * threshold), 0.0, 1.0)
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    return (anomaly_map - low) / (high - low) if high > low else np.zeros_like(anomaly_map)


def overlay(view: np.ndarray, anomaly_map: np.ndarray, threshold: float | None, alpha: float = 0.5) -> Image.Image:
    """An RGB image (the frame) with the coloured anomaly map of the same height and width blended over it."""
    if view.shape[:2] != anomaly_map.shape:
        raise ValueError(f"the map ({anomaly_map.shape}) and the image ({view.shape[:2]}) differ in size: give the map "
                         "in the image's pixels (Preprocessing.to_frame)")
    global _LUT
    if _LUT is None:
        _LUT = _colormap()
    level = normalize_map(anomaly_map, threshold)
    heat = _LUT[np.rint(level * 255).astype(np.uint8)]
    blended = (1.0 - alpha) * view.astype(np.float32) + alpha * heat.astype(np.float32)
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def defect_mask(anomaly_map: np.ndarray, threshold: float) -> Image.Image:
    """Pixels above the image threshold. In the network's view an image is anomalous exactly when this mask is not
    empty; a map resized to the frame (bilinear) can lose a peak that was only a hair above the threshold."""
    return Image.fromarray(((anomaly_map > threshold) * 255).astype(np.uint8), mode="L")
