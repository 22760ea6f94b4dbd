"""Image decoding and the paper's preprocessing: any file or array becomes the right RGB input.

Decoding, geometry and normalisation are NumPy and PIL only, so the ONNX runtime (no PyTorch installed)
shares them with the PyTorch path; the conversion to torch tensors is a thin layer that imports torch
only when called.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .array_ops import is_tensor
from .errors import FastpadimError, ImageError
from .sizes import Size, as_size, aspect_differs, format_size, to_json

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
EXIF_ORIENTATION = 0x0112
MIN_IMAGE_SIDE = 32  # below this an image carries too little detail for stride-16 features to mean anything
# Most decoded pixels in one image, checked from the header before anything is decoded: an RGB image costs 3 bytes
# a pixel (and copies while it is converted), so a 255 KB PNG of 9000x9000 would cost gigabytes. Change it with
# set_max_image_pixels() or per call (open_image's max_pixels); Pillow's own hard limit, 2 * PIL.Image.MAX_IMAGE_PIXELS
# (179 MP), stays the ceiling.
MAX_IMAGE_PIXELS = 40_000_000
# fastpadim checks the pixel count itself (above), so Pillow's DecompressionBombWarning (above 89 MP) would only
# repeat it on stderr, from a worker thread, for an image that is refused anyway or that the user allowed.
_QUIET_BOMB = ("ignore", None, Image.DecompressionBombWarning, None, 0)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor"]


class ImageTooLarge(ImageError):
    """An image whose header declares more pixels than the limit: refused before it is decoded."""


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.4g} MP"


def check_max_pixels(value, what: str = "--max-pixels") -> int:
    """A pixel limit is a whole number from 32x32 up to Pillow's own hard limit; anything else is refused."""
    ceiling = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FastpadimError(f"{what} must be a whole number of pixels, got {value!r}")
    if value < MIN_IMAGE_SIDE * MIN_IMAGE_SIDE or (ceiling is not None and value > ceiling):
        top = f" and {ceiling} (Pillow's own limit)" if ceiling is not None else ""
        raise FastpadimError(f"{what} must lie between {MIN_IMAGE_SIDE * MIN_IMAGE_SIDE}{top}, got {value}")
    return int(value)


def set_max_image_pixels(value: int) -> int:
    """Change the default pixel limit (``MAX_IMAGE_PIXELS``) for this process; returns the previous one.
    Threads started later see it; processes started elsewhere (Ray workers) keep their own."""
    global MAX_IMAGE_PIXELS
    previous, MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS, check_max_pixels(value)
    return previous


def check_pixels(size: tuple[int, int], label: str, max_pixels: int | None = None) -> int:
    """The pixel count of an image of ``size`` (width, height), or ImageTooLarge if above the limit."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = size
    pixels = width * height
    if pixels > limit:
        size = f"{pixels / 1e6:.1f} MP" if pixels >= 1_000_000 else megapixels(pixels)
        raise ImageTooLarge(f"{label}: {width}x{height} = {size} is above the limit of "
                            f"{megapixels(limit)}; downscale the image or raise the pixel limit (--max-pixels)")
    return pixels


@dataclass(frozen=True)
class Preprocessing:
    """Resize to ``image_size`` (bicubic), then centre-crop ``crop_size`` (None: resize only). Sizes are
    (height, width); an int is a square. A frame whose aspect ratio differs from ``image_size``'s is refused
    (it would be squashed) unless ``squash`` is set."""

    image_size: Size | int = 256
    crop_size: Size | int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    squash: bool = False

    @property
    def output_size(self) -> Size:
        """The network's input (height, width): the crop if there is one, else the resized image."""
        return self.crop_size or self.image_size  # type: ignore[return-value]

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_size(self.image_size))
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", as_size(self.crop_size, "crop size"))
        if min(self.image_size) < MIN_IMAGE_SIDE:
            raise FastpadimError(f"image size {format_size(self.image_size)} is too small; use at least {MIN_IMAGE_SIDE}")
        if self.crop_size is not None and not (
                MIN_IMAGE_SIDE <= min(self.crop_size) and all(c <= s for c, s in zip(self.crop_size, self.image_size))):
            raise FastpadimError(f"crop size {format_size(self.crop_size)} must lie between {MIN_IMAGE_SIDE} and the "
                                 f"image size {format_size(self.image_size)}")

    def _crop_box(self) -> tuple[int, int, int, int] | None:
        """(left, top, right, bottom) of the centre crop in the resized image; None without a crop."""
        if self.crop_size is None or self.crop_size == self.image_size:
            return None
        top, left = ((s - c) // 2 for s, c in zip(self.image_size, self.crop_size))
        return (left, top, left + self.crop_size[1], top + self.crop_size[0])

    def check_shape(self, frame: Size) -> None:
        """ImageError when resizing a frame of this (height, width) would stretch it (unless ``squash``)."""
        if not self.squash and aspect_differs(frame, self.image_size):
            height, width = self.image_size
            raise ImageError(
                f"{frame[1]}x{frame[0]} (width x height) would be squashed into this model's {width}x{height} input: "
                f"fit a model at its shape (--image-size {frame[0]}x{frame[1]} or --long-side), crop the frames, or "
                "allow squashing (--squash)")

    def resize(self, image: Image.Image) -> Image.Image:
        """The first step of ``geometry``: bicubic to ``image_size`` (``geometry`` of the result is the same as
        ``geometry`` of the original: PIL's resize to the same size is a copy)."""
        return image.resize((self.image_size[1], self.image_size[0]), Image.Resampling.BICUBIC)

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize and crop a PIL image (any mode that PIL can resize) to the network's view."""
        self.check_shape((image.height, image.width))
        image = self.resize(image)
        box = self._crop_box()
        return image.crop(box) if box else image

    def mask_geometry(self, mask: Image.Image) -> Image.Image:
        """The same geometry for a label mask: nearest neighbour so it stays binary."""
        mask = mask.resize((self.image_size[1], self.image_size[0]), Image.Resampling.NEAREST)
        box = self._crop_box()
        return mask.crop(box) if box else mask

    def to_frame(self, anomaly_map: np.ndarray, frame: Size) -> np.ndarray:
        """An anomaly map of the network's view (``output_size``) back in the frame's own pixels (height, width):
        the crop put back where it was cut (the border it cut off, never inspected, reads 0) and the whole
        resized to the frame, bilinear. float32."""
        amap = np.asarray(anomaly_map, dtype=np.float32)
        box = self._crop_box()
        if box:
            full = np.zeros(self.image_size, dtype=np.float32)
            full[box[1]:box[3], box[0]:box[2]] = amap
            amap = full
        if amap.shape == tuple(frame):
            return amap
        resized = Image.fromarray(amap, mode="F").resize((frame[1], frame[0]), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32)

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
        crop = to_json(self.crop_size) if self.crop_size is not None else None
        return {"image_size": to_json(self.image_size), "crop_size": crop, "mean": list(self.mean),
                "std": list(self.std), "squash": self.squash}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        crop = d["crop_size"]
        return cls(as_size(d["image_size"]), as_size(crop) if crop is not None else None, tuple(d["mean"]),
                   tuple(d["std"]), bool(d.get("squash", False)))


def to_rgb(image: Image.Image, owned: bool = False) -> Image.Image:
    """Any PIL mode (grayscale, 16-bit, float, RGBA, palette, CMYK) → 8-bit RGB, EXIF orientation applied.
    ``owned``: the image was just decoded here and may be changed and returned (no copy of a large RGB image)."""
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
    else:
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
    if owned and image.mode == "RGB":
        return image
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


def _bomb_message(label: str, exc: Exception, limit: int) -> str:
    """Pillow's own refusal (above 179 MP, raised while reading the header) in the words of check_pixels."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "the image"
    return (f"{label}: {size} is above the limit of {megapixels(limit)}; downscale the image or raise the pixel "
            "limit (--max-pixels)")


def _quiet_pillow_bomb_warning() -> None:
    """Put the filter for Pillow's DecompressionBombWarning in place if it is not (checked at each decode, not set
    once at import: a ``warnings.catch_warnings`` block around the import, as pytest's, would take it away again)."""
    if _QUIET_BOMB not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@contextmanager
def _image_errors(label: str, limit: int) -> Iterator[None]:
    """Every failure of reading this one image becomes one ImageError line; a MemoryError is the machine's
    problem, not the image's, and propagates (as do KeyboardInterrupt and SystemExit, which are no Exception)."""
    try:
        yield
    except (ImageError, MemoryError):
        raise
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file (or a format PIL cannot read)") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(_bomb_message(label, exc, limit)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure (NotImplementedError, struct.error, ...)
        raise ImageError(f"{label}: cannot decode this image ({type(exc).__name__}: {first_line(exc)})") from None


def _decode(source, label: str, max_pixels: int | None = None, reduce_to: int | Size | None = None) -> Image.Image:
    """Open a path or a binary stream, check its size from the header, then decode it (errors: _image_errors).

    ``reduce_to``: the network's input (height, width); a JPEG at least twice as large on both sides is decoded at 1/2, 1/4
    or 1/8 scale (draft mode) to no less than that side, so the usual bicubic resize still makes the final size.
    Other formats are decoded in full, exactly as before."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    reduce_to = as_size(reduce_to) if reduce_to is not None else None
    _quiet_pillow_bomb_warning()
    with _image_errors(label, limit), Image.open(source) as handle:  # Image.open reads the header only
        check_pixels(handle.size, label, limit)
        if reduce_to and handle.format == "JPEG" and handle.height >= 2 * reduce_to[0] \
                and handle.width >= 2 * reduce_to[1]:
            handle.draft("RGB", (reduce_to[1], reduce_to[0]))
        handle.load()  # decode now so truncated files fail here, not later
        return to_rgb(handle, owned=True)


def read_size(item: str | os.PathLike | bytes, name: str | None = None,
              max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of an encoded image from its header alone, nothing decoded, as it is decoded (an EXIF
    rotation by a quarter turn swaps them); ImageError when it cannot be read, ImageTooLarge when above
    ``max_pixels`` (default ``MAX_IMAGE_PIXELS``)."""
    label = name or (str(item) if isinstance(item, (str, os.PathLike)) else "image")
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise ImageError(f"{label}: empty file (0 bytes)")
        item = io.BytesIO(item)
    _quiet_pillow_bomb_warning()
    with _image_errors(label, limit), Image.open(item) as handle:
        check_pixels(handle.size, label, limit)
        quarter_turn = handle.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # as to_rgb's exif_transpose
        return (handle.height, handle.width) if quarter_turn else handle.size


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def open_image(item: ImageInput | bytes | io.IOBase, name: str | None = None, max_pixels: int | None = None,
               reduce_to: int | Size | None = None) -> Image.Image:
    """Decode one input (path, bytes, binary stream, PIL image, array, tensor) to an RGB PIL image,
    or raise ImageError with a one-line reason that starts with ``name`` (default: the path).

    Encoded inputs (paths, bytes, streams) above ``max_pixels`` (default ``MAX_IMAGE_PIXELS``) are refused from
    their header (ImageTooLarge) before decoding; ``reduce_to`` (the network's input size) lets a large JPEG be
    decoded at a reduced scale (see ``_decode``). Images already in memory are not limited."""
    label = name or (str(item) if isinstance(item, (str, os.PathLike)) else "image")
    if isinstance(item, (str, os.PathLike)):
        image = _decode(Path(item), label, max_pixels, reduce_to)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise ImageError(f"{label}: empty file (0 bytes)")
        image = _decode(io.BytesIO(item), label, max_pixels, reduce_to)
    elif isinstance(item, io.IOBase):
        image = _decode(item, label, max_pixels, reduce_to)
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
    """One decoded input: the network's input (float32 3xHxW), the frame as decoded (RGB, at its own size, with
    ``keep_view``, for overlays and maps in the frame's pixels), or the reason it failed."""

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


def load_one(item: ImageInput, index: int, preprocessing: Preprocessing, keep_view: bool,
             max_pixels: int | None = None) -> LoadedImage:
    name = image_name(item, index)
    try:
        # A kept frame is decoded at full size (no reduced JPEG decoding): overlays and maps are in its pixels.
        image = open_image(item, max_pixels=max_pixels, reduce_to=None if keep_view else preprocessing.image_size)
        try:
            network_view = np.array(preprocessing.geometry(image))  # writable copy for torch
        except ImageError as exc:
            raise ImageError(f"{name}: {exc}") from None
    except ImageError as exc:
        return LoadedImage(index, name, error=str(exc))
    return LoadedImage(index, name, preprocessing.normalize_array(network_view), np.asarray(image) if keep_view else None)


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
    max_pixels: int | None = None,
) -> Iterator[list[LoadedImage]]:
    """Decode and preprocess in a thread pool (PIL releases the GIL), one batch ahead of the consumer.
    ``max_pixels``: the per-image pixel limit for encoded inputs (default ``MAX_IMAGE_PIXELS``)."""
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
            futures = [pool.submit(load_one, item, start + i, preprocessing, keep_view, max_pixels)
                       for i, item in enumerate(chunk)]
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


def batch_recorder(skipped: list, digest=None, progress=None):
    """What a fit does with each batch it has finished: its unreadable inputs go to ``skipped`` (name, reason),
    its readable inputs' network pixels to ``digest`` (a hashlib object), its size to ``progress``."""

    def done(batch: list[LoadedImage]) -> None:
        skipped.extend((item.name, item.error) for item in batch if item.error)
        if digest is not None:
            for item in batch:
                if item.array is not None:
                    digest.update(item.array.tobytes())
        if progress:
            progress(len(batch))

    return done


def stack_arrays(batch: list[LoadedImage]) -> np.ndarray:
    """The readable inputs of a batch as one float32 (B, 3, H, W) array."""
    return np.stack([item.array for item in batch if item.array is not None])


def stack(batch: list[LoadedImage]) -> torch.Tensor:
    """The same as a torch tensor (no copy)."""
    import torch

    return torch.from_numpy(stack_arrays(batch))
