"""A small, realistic inspection set made on the fly: brushed-metal-like textured surfaces, some with
scratches or spots, and the exact defect masks. Used by ``fastpadim demo`` and the tests (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage


def surface(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A textured surface: grain along one direction, low-frequency shading and sensor noise (uint8 RGB)."""
    grain = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=(0.6, 6.0))  # brushed along x
    # The shading's scale follows the image size: a fixed σ = 40 on a small image leaves a near-constant field
    # whose division by its (tiny) std saturates the whole image to black or white.
    shading = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=40.0 * size / 256)
    value = 0.55 + 0.9 * grain / grain.std() * 0.05 + shading / shading.std() * 0.03 + rng.normal(0, 0.01, (size, size))
    tint = np.array([1.0, 0.97, 0.9]) * rng.uniform(0.95, 1.05)
    rgb = np.clip(value[..., None] * tint, 0, 1)
    return (rgb * 255).astype(np.uint8)


def add_scratch(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0 = rng.uniform(0.2, 0.8, 2) * size
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.35) * size
    x1, y1 = x0 + np.cos(angle) * length, y0 + np.sin(angle) * length
    draw.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(2, 4)))
    m = np.asarray(mask) > 0
    out = image.astype(np.float32)
    out[m] = out[m] * 0.45 + 255 * 0.05  # a dark groove
    return out.astype(np.uint8), m


def add_spot(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = Image.new("L", (size, size), 0)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    rx, ry = rng.uniform(0.03, 0.07, 2) * size
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32) / 255.0
    colour = np.array([120, 70, 30], dtype=np.float32) if rng.random() < 0.5 else np.array([235, 235, 230], np.float32)
    out = image.astype(np.float32) * (1 - soft[..., None] * 0.8) + colour * soft[..., None] * 0.8
    return np.clip(out, 0, 255).astype(np.uint8), np.asarray(mask) > 0


def make_dataset(root: str | Path, n_train: int = 60, n_test_good: int = 12, n_test_defect: int = 12,
                 size: int = 256, seed: int = 0) -> Path:
    """Write an MVTec-AD-like layout: train/good, test/{good,scratch,spot}, ground_truth/<type>/<stem>_mask.png."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder in ("train/good", "test/good", "test/scratch", "test/spot", "ground_truth/scratch", "ground_truth/spot"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(surface(rng, size)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_test_good):
        Image.fromarray(surface(rng, size)).save(root / "test/good" / f"{i:03d}.png")
    for kind, add in (("scratch", add_scratch), ("spot", add_spot)):
        for i in range(n_test_defect):
            image, mask = add(rng, surface(rng, size))
            Image.fromarray(image).save(root / "test" / kind / f"{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root
