"""fastpadim: PaDiM anomaly detection and localization for industrial visual inspection."""

__version__ = "0.1.0"

from .backbone import PRESETS  # noqa: E402
from .errors import FastpadimError, ImageError  # noqa: E402
from .model import Padim, Predictions  # noqa: E402


def load(path, device: str = "auto", weights=None) -> Padim:
    """Load a fitted model file (``Padim.load``)."""
    return Padim.load(path, device=device, weights=weights)


__all__ = ["Padim", "Predictions", "PRESETS", "FastpadimError", "ImageError", "load", "__version__"]
