"""The PaDiM paper's non-aligned protocol "Rd-MVTec AD" (Section IV-A): every train and test image is resized to
256×256, rotated by a random angle in (−10°, +10°) and cropped at a random 224×224 window; its mask gets the
identical rotation and crop. Draws depend only on (seed, split, index), so they can be regenerated lazily."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import open_image

RD_IMAGE_SIZE = 256
RD_CROP_SIZE = 224
RD_MAX_ANGLE = 10.0
SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class RdTransform:
    seed: int
    split: str = "train"

    def params(self, index: int) -> tuple[float, int, int]:
        """(angle in degrees, left, top) for the image at ``index``."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        angle = float(rng.uniform(-RD_MAX_ANGLE, RD_MAX_ANGLE))
        left, top = (int(v) for v in rng.integers(0, RD_IMAGE_SIZE - RD_CROP_SIZE + 1, size=2))
        return angle, left, top

    def _apply(self, image: Image.Image, index: int, resample: Image.Resampling, rotate_resample) -> Image.Image:
        angle, left, top = self.params(index)
        image = image.resize((RD_IMAGE_SIZE, RD_IMAGE_SIZE), resample)
        image = image.rotate(angle, resample=rotate_resample, expand=False, fillcolor=0)  # corners become black
        return image.crop((left, top, left + RD_CROP_SIZE, top + RD_CROP_SIZE))

    def image(self, image: Image.Image, index: int) -> np.ndarray:
        """RGB uint8 (224, 224, 3)."""
        rgb = image.convert("RGB")
        return np.asarray(self._apply(rgb, index, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR))

    def mask(self, mask: Image.Image, index: int) -> np.ndarray:
        """bool (224, 224): nearest neighbour throughout, so the mask stays binary."""
        from .datasets import mask_array

        gray = Image.fromarray(mask_array(mask).astype(np.uint8) * 255)
        return mask_array(self._apply(gray, index, Image.Resampling.NEAREST, Image.Resampling.NEAREST))


def transformed_images(paths: Sequence[Path], transform: RdTransform) -> Iterator[np.ndarray]:
    """Lazily decode and transform images, for ``Padim.fit`` / ``iter_scored`` (image_size=224, no crop)."""
    for index, path in enumerate(paths):
        yield transform.image(open_image(path), index)
