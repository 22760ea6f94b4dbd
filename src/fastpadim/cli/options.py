"""Options shared by several commands, declared once, and the checks that make a bad value one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError

MAX_FOLDS = 100  # model.MAX_FOLDS (not imported: the CLI's options load without torch)

BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Preset (efficientnet_lite0, resnet18, wide_resnet50_2, efficientnet_b5) or a timm model name.")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Backbone weights file (.safetensors/.pth); default: the offline package or timm's hub cache.")]
AllowDownloadOpt = Annotated[bool, typer.Option("--allow-download", help="Let timm download backbone weights from the model hub if they are not on this machine (never by default).")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Layer indices for timm's forward_intermediates, e.g. 1,2,3.")]
FeaturesOpt = Annotated[Optional[int], typer.Option("--n-features", "-d", help="Random channel subset size (Rd); default: the preset's.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
EngineOpt = Annotated[Optional[str], typer.Option(help="What runs the network: torch (the default for .padim), onnxruntime (the default for .onnx), openvino, or auto (the fastest installed engine whose outputs match torch's within 1e-4); all in float32 unless --precision says otherwise.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="Inference precision: f32 (default, every engine); bf16 or f16 only with --engine openvino on a CPU that has them.")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option(help="Most pixels in one image, read from its header before decoding (default 40 MP; larger images are skipped).")]
ImageSizeOpt = Annotated[str, typer.Option(help="Network input: N (a square) or HxW, height x width, e.g. 960x1280 for 1280x960 frames; rounded to the backbone's stride.")]
LongSideOpt = Annotated[Optional[int], typer.Option(help="Keep the training frames' own aspect ratio, with this many pixels on the long side (instead of --image-size).")]
SquashOpt = Annotated[bool, typer.Option("--squash", help="Resize frames of another aspect ratio than the model's anyway (stretched); by default they are refused.")]
PoolOpt = Annotated[int, typer.Option(help="Average the embedding over PxP positions: a P² smaller Gaussian state and model, coarser maps.")]
EpsilonOpt = Annotated[float, typer.Option(help="Covariance regularisation εI (the paper: 0.01); larger values shrink each position's covariance, which helps when the good images vary little.")]
BlurSigmaOpt = Annotated[float, typer.Option(help="Gaussian blur of the anomaly map, in input pixels (the paper: 4); smaller keeps the peaks of defects a few pixels wide.")]
TileOpt = Annotated[Optional[int], typer.Option(help="Cut the input into tiles of this side (fixed grid, each tile position with its own Gaussians): bounds the network's memory for large frames.")]
TileOverlapOpt = Annotated[Optional[int], typer.Option(help="Overlap of neighbouring tiles in pixels (default: a quarter of --tile).")]
TileSharedOpt = Annotated[bool, typer.Option("--tile-shared", help="All tiles share one set of Gaussians (uniform textures): the state of one tile.")]
CropSizeOpt = Annotated[int, typer.Option(help="Centre crop after resizing (the paper: 224); 0 = none, the whole image is inspected.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per network batch.")]
RayOpt = Annotated[Optional[str], typer.Option("--ray", metavar="local[:N]|auto|ADDRESS", help="Run on Ray: an embedded local Ray with N workers (--ray alone: local), or join a cluster.")]
FrameStrideOpt = Annotated[int, typer.Option(help="Videos: use every K-th frame.")]
CpusPerTaskOpt = Annotated[float, typer.Option(help="With --ray: CPUs (threads) per task.")]


def parse_layers(layers: str | None) -> tuple[int, ...] | None:
    if not layers:
        return None
    try:
        return tuple(int(part) for part in layers.split(","))
    except ValueError:
        raise FastpadimError(f"--layers takes comma-separated integers, e.g. 1,2,3; got {layers!r}") from None


def parse_folds(folds: str) -> int | str:
    """--folds: "all" (leave-one-out) or a number of folds, 0 for none; 1 would score a fold by no model."""
    if folds.strip().lower() == "all":
        return "all"
    try:
        value = int(folds)
    except ValueError:
        value = None
    if value is None or not (value == 0 or 2 <= value <= MAX_FOLDS):
        raise FastpadimError(f"--folds must be all (leave-one-out), 0 (no out-of-fold threshold) or from 2 to "
                             f"{MAX_FOLDS}, got {folds}")
    return value


def check_options(*, n_features: int | None = None, seed: int | None = None, folds: str | None = None,
                  holdout: float | None = None, false_alarm_rate: float | None = None) -> None:
    """Options that would otherwise mean something else (0 channels = all) or fail deep inside, refused up front."""
    if n_features is not None and n_features < 1:
        raise FastpadimError(f"--n-features must be at least 1, got {n_features}; omit it for the preset's")
    if seed is not None and not 0 <= seed < 2**63:
        raise FastpadimError(f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}")
    if folds is not None:
        parse_folds(folds)
    if holdout is not None and not 0 <= holdout < 1:
        raise FastpadimError(f"--holdout must be in [0, 1), got {holdout}; 0 holds no images out")
    if false_alarm_rate is not None and not 0 < false_alarm_rate < 1:
        raise FastpadimError(f"--false-alarm-rate must be between 0 and 1 (exclusive), e.g. 0.01; got {false_alarm_rate}")


def shape_params(image_size: str, long_side: int | None, squash: bool, pool: int, tile: int | None,
                 tile_overlap: int | None, tile_shared: bool, first_frame: Callable[[], tuple[int, int]]) -> dict:
    """The model's shape parameters from the command line; ``first_frame`` gives the (height, width) of the first
    training frame, read only for --long-side."""
    from ..sizes import for_long_side, parse_size

    size = parse_size(image_size)
    if long_side is not None:
        if long_side < 32:
            raise FastpadimError(f"--long-side must be at least 32, got {long_side}")
        size = for_long_side(long_side, first_frame())
    if (tile_overlap is not None or tile_shared) and tile is None:
        raise FastpadimError("--tile-overlap and --tile-shared need --tile")
    return dict(image_size=size, squash=squash, pool=pool, tile=tile, tile_overlap=tile_overlap, tile_shared=tile_shared)


def apply_max_pixels(max_pixels: int | None) -> None:
    """--max-pixels: the decoded-pixel limit for this run (images above it are skipped, read from the header)."""
    if max_pixels is not None:
        from ..images import set_max_image_pixels

        set_max_image_pixels(max_pixels)
