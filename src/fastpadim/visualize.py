"""Heatmap overlays and binary defect masks for people to look at, in the pixels of the image they are given: with
the frame and its ``frame_map`` (``ScoredImage.view`` and ``.frame_map``) they lie over the camera image as it is.
An overlay can carry a ``Label`` (verdict, score, score / threshold) drawn on it, so that an overlay file or a
heatmap saved from the web page says what it showed without the CSV beside it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .results import verdict_label

if TYPE_CHECKING:
    from .results import ScoredImage


def _colormap() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


_LUT: np.ndarray | None = None

# The label's text: its height is this share of the frame's shorter side (text scales with the frame, so it stays
# readable when a 5 MP overlay is shown shrunk to a screen), never below LEGIBLE_PX unless the frame is too narrow.
TEXT_SHARE = 0.05
LEGIBLE_PX = 10
MIN_TEXT_PX = 6  # below this the frame gets no text: it could not be read anyway
MAX_BAND_SHARE = 0.4  # the dark band covers at most this share of the frame's height (else fewer lines)
BAND_DARKNESS = 0.65  # the band keeps a third of the overlay's light: text on it reads on any heatmap colour
VERDICT_COLOURS = {"anomalous": (255, 96, 86), "good": (110, 226, 126), "unknown": (240, 212, 90)}
TEXT_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Label:
    """What an overlay says about its image: the verdict (anomalous, good, unknown), the raw score and the score
    as a multiple of the threshold (``ScoredImage.normalized``; None without a threshold)."""

    verdict: str
    score: float
    normalized: float | None = None

    @classmethod
    def of(cls, result: ScoredImage, threshold: float | None) -> Label:
        """A scored image's label against ``threshold`` (the one its ``normalized`` was computed for)."""
        return cls(verdict_label(result.score, threshold), result.score, result.normalized)

    def variants(self) -> list[list[str]]:
        """The text from the fullest to the shortest: a narrow frame gets a shorter one rather than tiny letters.
        ASCII only: the default font has no "×"."""
        verdict, score = self.verdict.upper(), f"{self.score:.4g}"
        if self.normalized is None:
            return [[verdict, f"score {score} (no threshold)"], [verdict, f"score {score}"], [f"{verdict} {score}"]]
        times = f"{self.normalized:.2f}x"
        return [[verdict, f"score {score} = {times} threshold"], [verdict, f"{score} = {times}"],
                [f"{verdict} {times}"]]


def normalize_map(anomaly_map: np.ndarray, threshold: float | None) -> np.ndarray:
    """Map scores to 0..1 on a fixed scale: the threshold sits at the middle, so good images stay cool.

    Without a threshold the map's own range is used (then every image shows some "hot" spot).
    """
    if threshold is not None and threshold > 0:
        return np.clip(anomaly_map / (2.0 * threshold), 0.0, 1.0)
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    return (anomaly_map - low) / (high - low) if high > low else np.zeros_like(anomaly_map)


def overlay(view: np.ndarray, anomaly_map: np.ndarray, threshold: float | None, alpha: float = 0.5,
            label: Label | None = None) -> Image.Image:
    """An RGB image (the frame) with the coloured anomaly map of the same height and width blended over it, and
    the ``label`` drawn in a dark band at its top (the image keeps the frame's size)."""
    if view.shape[:2] != anomaly_map.shape:
        raise ValueError(f"the map ({anomaly_map.shape}) and the image ({view.shape[:2]}) differ in size: give the map "
                         "in the image's pixels (Preprocessing.to_frame)")
    global _LUT
    if _LUT is None:
        _LUT = _colormap()
    level = normalize_map(anomaly_map, threshold)
    heat = _LUT[np.rint(level * 255).astype(np.uint8)]
    blended = (1.0 - alpha) * view.astype(np.float32) + alpha * heat.astype(np.float32)
    image = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    return draw_label(image, label) if label is not None else image


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font, scalable where Pillow has FreeType (else its fixed bitmap font); kept per size,
    # as each frame size tries a few
    return ImageFont.load_default(size=size)


def _line_height(size: int) -> int:
    return size + max(1, size // 5)


def _fit(label: Label, width: int, height: int) -> tuple[list[str], ImageFont.ImageFont, int, int] | None:
    """(lines, font, size, padding): the fullest text variant that fits the frame at nearly the size aimed for,
    else the shortest at the largest size that fits; None if even that would be below MIN_TEXT_PX."""
    target = max(LEGIBLE_PX, round(TEXT_SHARE * min(width, height)))
    pad = max(2, target // 4)
    chosen = None
    for lines in label.variants():
        size = target
        while size >= MIN_TEXT_PX:
            font = _font(size)
            wide = max(font.getlength(line) for line in lines)
            if wide <= width - 2 * pad and len(lines) * _line_height(size) + 2 * pad <= MAX_BAND_SHARE * height:
                break
            size -= max(1, size // 10)
        else:
            continue
        chosen = (lines, font, size, pad)
        if size >= 0.75 * target:
            return chosen
    return chosen


def draw_label(image: Image.Image, label: Label) -> Image.Image:
    """``label`` drawn on ``image`` (RGB, in place; returned), in a dark band across its top, the text sized to the
    frame: the verdict in its colour, then the score and its multiple of the threshold. A frame too small for any
    text is left as it is."""
    fitted = _fit(label, image.width, image.height)
    if fitted is None:
        return image
    lines, font, size, pad = fitted
    line_height = _line_height(size)
    band = min(image.height, len(lines) * line_height + 2 * pad)
    # only the band is darkened (a lookup table per channel): a 20 MP overlay is not copied for a label
    image.paste(Image.eval(image.crop((0, 0, image.width, band)), lambda v: int(v * (1.0 - BAND_DARKNESS))))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        colour = VERDICT_COLOURS.get(label.verdict, TEXT_COLOUR) if i == 0 else TEXT_COLOUR
        draw.text((pad, pad + i * line_height), line, font=font, fill=colour)
    return image


def defect_mask(anomaly_map: np.ndarray, threshold: float) -> Image.Image:
    """Pixels above the image threshold. In the network's view an image is anomalous exactly when this mask is not
    empty; a map resized to the frame (bilinear) can lose a peak that was only a hair above the threshold."""
    return Image.fromarray(((anomaly_map > threshold) * 255).astype(np.uint8), mode="L")
