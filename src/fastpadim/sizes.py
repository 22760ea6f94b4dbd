"""Image sizes as (height, width): parsed from the command line, checked, rounded to the network's stride.

NumPy order (rows, columns) everywhere in fastpadim; PIL's (width, height) only where PIL is called.
"""

from __future__ import annotations

import math
import re

from .errors import FastpadimError

Size = tuple[int, int]  # (height, width)
CPU_FORWARD_IMAGES = 8  # 256x256 inputs per network call on the CPU (bounds activation memory)
FORWARD_PIXELS = CPU_FORWARD_IMAGES * 256 * 256  # input pixels of one network call on the CPU
ASPECT_TOLERANCE = 0.02  # relative aspect difference still taken as "the same shape" (rounding to a stride moves it)


def as_size(value, what: str = "image size") -> Size:
    """An int (a square) or two ints (height, width) → (height, width); anything else is refused."""
    if isinstance(value, str):
        return parse_size(value, what)
    if isinstance(value, bool):
        raise FastpadimError(f"{what} must be N or (height, width), got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise FastpadimError(f"{what} must be N or (height, width), got {value!r}")


def parse_size(text: str, what: str = "--image-size") -> Size:
    """'256' → (256, 256); '960x1280' → (960, 1280) (height x width, as NumPy shapes)."""
    found = re.fullmatch(r"\s*(\d{1,6})\s*(?:[xX×]\s*(\d{1,6}))?\s*", str(text))
    if not found:
        raise FastpadimError(f"{what} must be N (a square) or HxW such as 960x1280 (height x width), got {text!r}")
    height = int(found.group(1))
    return (height, int(found.group(2)) if found.group(2) else height)


def format_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def to_json(size: Size) -> int | list[int]:
    """A square as one number (model files written before rectangular sizes read the same), else [h, w]."""
    return size[0] if size[0] == size[1] else [size[0], size[1]]


def round_to(size: Size, step: int) -> Size:
    """The nearest multiple of ``step`` on each side (at least one step): feature maps then tile the input exactly."""
    return tuple(max(step, math.floor(side / step + 0.5) * step) for side in size)  # type: ignore[return-value]


def for_long_side(long_side: int, frame: Size) -> Size:
    """The (height, width) that keeps ``frame``'s aspect ratio with its longer side equal to ``long_side``."""
    height, width = frame
    scale = long_side / max(height, width)
    return (max(1, round(height * scale)), max(1, round(width * scale)))


def aspect_differs(frame: Size, model: Size, tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether resizing ``frame`` to ``model`` would stretch it by more than ``tolerance`` (relative)."""
    ratio = (frame[1] / frame[0]) / (model[1] / model[0])
    return abs(math.log(ratio)) > math.log1p(tolerance)


def inputs_per_call(pixels: int) -> int:
    """Inputs of ``pixels`` each in one network call on the CPU, at least one: the network runs as fast on 8 images
    of 256x256 as on 32, with a quarter of the activations, so large frames go a few (or one) at a time."""
    return max(1, FORWARD_PIXELS // pixels)
