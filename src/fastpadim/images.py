"""Image decoding and the paper's preprocessing: any file or array becomes the right RGB input.

Decoding, geometry and normalisation are NumPy and PIL only, so the ONNX runtime (no PyTorch installed)
shares them with the PyTorch path; the conversion to torch tensors is a thin layer that imports torch
only when called.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FastpadimError, ImageError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MIN_IMAGE_SIDE = 32  # below this an image carries too little detail for stride-16 features to mean anything

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor"]


def is_tensor(item) -> bool:
    """A torch tensor, checked without importing torch (a tensor exists only if torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(item, torch.Tensor)


@dataclass(frozen=True)
class Preprocessing:
    """Resize to ``image_size`` (bicubic), then centre-crop ``crop_size`` (None: resize only)."""

    image_size: int = 256
    crop_size: int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def output_size(self) -> int:
        return self.crop_size or self.image_size

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIDE:
            raise FastpadimError(f"image size {self.image_size} is too small; use at least {MIN_IMAGE_SIDE}")
        if self.crop_size is not None and not (MIN_IMAGE_SIDE <= self.crop_size <= self.image_size):
            raise FastpadimError(
                f"crop size {self.crop_size} must lie between {MIN_IMAGE_SIDE} and the image size {self.image_size}"
            )

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize and crop a PIL image (any mode that PIL can resize) to the network's view."""
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.crop_size is not None and self.crop_size != self.image_size:
            left = (self.image_size - self.crop_size) // 2
            image = image.crop((left, left, left + self.crop_size, left + self.crop_size))
        return image

    def mask_geometry(self, mask: Image.Image) -> Image.Image:
        """The same geometry for a label mask: nearest neighbour so it stays binary."""
        mask = mask.resize((self.image_size, self.image_size), Image.Resampling.NEAREST)
        if self.crop_size is not None and self.crop_size != self.image_size:
            left = (self.image_size - self.crop_size) // 2
            mask = mask.crop((left, left, left + self.crop_size, left + self.crop_size))
        return mask

    def normalize_array(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 → float32 3xHxW normalised with the backbone's mean and std (NumPy)."""
        array = np.asarray(rgb).transpose(2, 0, 1).astype(np.float32)  # a new C-contiguous array
        array /= np.float32(255.0)
        array -= np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        array /= np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return array

    def normalize(self, rgb: np.ndarray) -> torch.Tensor:
        """The same as a torch tensor (shares the array's memory)."""
        import torch

        return torch.from_numpy(self.normalize_array(rgb))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "crop_size": self.crop_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(d["image_size"], d["crop_size"], tuple(d["mean"]), tuple(d["std"]))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (grayscale, 16-bit, float, RGBA, palette, CMYK) → 8-bit RGB, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 257.0  # 16-bit full range → 8-bit full range
        elif image.mode == "I" and array.max(initial=0) > 255:
            array = array / 257.0  # 32-bit container holding 16-bit data (PIL's usual reading of 16-bit PNGs)
        elif image.mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become black, as a camera would see an empty background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW → HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"array of shape {tuple(array.shape)} is not an image (expected HxW, HxWx3 or 3xHxW)")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if array.dtype == np.uint16:
        return Image.fromarray((array.astype(np.float64) / 257.0).round().astype(np.uint8))
    if np.issubdtype(array.dtype, np.floating) or array.dtype == bool:
        scaled = np.clip(np.asarray(array, dtype=np.float64), 0.0, 1.0) * 255.0  # floats are taken as 0..1
        return Image.fromarray(scaled.round().astype(np.uint8))
    raise ImageError(f"array of dtype {array.dtype} is not supported (use uint8, uint16 or float in 0..1)")


def image_name(item: ImageInput, index: int) -> str:
    """A name for reports: the path for files, a position for in-memory images."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"<image {index}>"


def _decode(source, label: str) -> Image.Image:
    """Open and fully decode a path or a binary stream; every failure becomes one ImageError line."""
    try:
        with Image.open(source) as handle:
            handle.load()  # decode now so truncated files fail here, not later
            return to_rgb(handle)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file (or a format PIL cannot read)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None


def open_image(item: ImageInput | bytes | io.IOBase, name: str | None = None) -> Image.Image:
    """Decode one input (path, bytes, binary stream, PIL image, array, tensor) to an RGB PIL image,
    or raise ImageError with a one-line reason that starts with ``name`` (default: the path)."""
    label = name or (str(item) if isinstance(item, (str, os.PathLike)) else "image")
    if isinstance(item, (str, os.PathLike)):
        image = _decode(Path(item), label)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise ImageError(f"{label}: empty (0 bytes)")
        image = _decode(io.BytesIO(item), label)
    elif isinstance(item, io.IOBase):
        image = _decode(item, label)
    elif isinstance(item, Image.Image):
        image = to_rgb(item)
    elif is_tensor(item):
        image = to_rgb(_array_to_pil(item.detach().cpu().numpy()))
    elif isinstance(item, np.ndarray):
        image = to_rgb(_array_to_pil(item))
    else:
        raise ImageError(f"cannot read an image from a {type(item).__name__}")
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        where = f"{label}: " if name or isinstance(item, (str, os.PathLike)) else ""
        raise ImageError(f"{where}image is {width}x{height}; fastpadim needs at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    return image


@dataclass
class LoadedImage:
    """One decoded input: the network's input (float32 3xHxW), the RGB view it saw (for overlays), or the
    reason it failed."""

    index: int
    name: str
    array: np.ndarray | None = None
    view: np.ndarray | None = None
    error: str | None = None

    @property
    def tensor(self) -> torch.Tensor | None:
        """The input as a torch tensor (no copy)."""
        if self.array is None:
            return None
        import torch

        return torch.from_numpy(self.array)


def load_one(item: ImageInput, index: int, preprocessing: Preprocessing, keep_view: bool) -> LoadedImage:
    name = image_name(item, index)
    try:
        view = np.array(preprocessing.geometry(open_image(item)))  # writable copy for torch
    except ImageError as exc:
        return LoadedImage(index, name, error=str(exc))
    return LoadedImage(index, name, preprocessing.normalize_array(view), view if keep_view else None)


def single_or_many(images) -> Iterable[ImageInput]:
    """A list of inputs, or one input given on its own (a path, a PIL image, or an array or tensor that is not a
    4-D batch)."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or is_tensor(images):
        if not (isinstance(images, np.ndarray) or is_tensor(images)) or images.ndim != 4:
            return [images]
    return images


def iter_batches(
    items: Iterable[ImageInput],
    preprocessing: Preprocessing,
    batch_size: int,
    workers: int = 2,
    keep_view: bool = False,
) -> Iterator[list[LoadedImage]]:
    """Decode and preprocess in a thread pool (PIL releases the GIL), one batch ahead of the consumer."""
    if batch_size < 1:
        raise FastpadimError(f"batch size must be at least 1, got {batch_size}")
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        start = 0

        def submit_next():
            nonlocal start
            chunk = []
            for item in iterator:
                chunk.append(item)
                if len(chunk) == batch_size:
                    break
            futures = [pool.submit(load_one, item, start + i, preprocessing, keep_view) for i, item in enumerate(chunk)]
            start += len(chunk)
            return futures

        pending = submit_next()
        while pending:
            upcoming = submit_next()  # decoding of the next batch overlaps with the network on this one
            yield [f.result() for f in pending]
            pending = upcoming


def list_images(source: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files in a folder (sorted), or the file itself; a clear error when there are none."""
    path = Path(source)
    if not path.exists():
        raise FastpadimError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    if not os.access(path, os.R_OK | os.X_OK):
        raise FastpadimError(f"{path}: permission denied")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise FastpadimError(f"{path}: no images found (looked for {kinds})")
    return files


def stack_arrays(batch: list[LoadedImage]) -> np.ndarray:
    """The readable inputs of a batch as one float32 (B, 3, H, W) array."""
    return np.stack([item.array for item in batch if item.array is not None])


def stack(batch: list[LoadedImage]) -> torch.Tensor:
    """The same as a torch tensor (no copy)."""
    import torch

    return torch.from_numpy(stack_arrays(batch))
