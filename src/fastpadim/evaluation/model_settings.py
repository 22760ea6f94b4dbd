"""What an evaluation report states about the model it measured: the values actually used (the preset's layers,
the weights found, the rounded network size), read from the fitted or loaded model, never the options as typed
(an option left out reads None, which says nothing about the model)."""

from __future__ import annotations

from ..sizes import as_size, format_size


def model_metadata(model) -> dict:
    """The model file's metadata schema (``fastpadim.metadata``) for a fitted ``Padim``, a loaded one or an
    ``OnnxPadim``: one source of truth for what the model is. A loaded model's is the file's as read (its
    fastpadim version is the one that wrote it)."""
    stored = getattr(model, "metadata_", None)
    return stored if stored is not None else model.to_metadata()


def _size(value) -> str:
    """A stored size (N for a square, or [height, width]) as HxW."""
    return "none" if value is None else format_size(as_size(value))


def model_settings(model) -> dict:
    """The model's resolved settings, in the order a reader checks them. ``SummedPadim`` (one model per layer)
    is described by its first member, with all its layers and each member's channel count."""
    members = getattr(model, "members_", None)
    meta = model_metadata(members[0] if members else model)
    backbone, pre = meta["backbone"], meta["preprocessing"]
    tiling = meta.get("tiling")
    crop = pre.get("crop_size")
    settings = {
        "backbone": backbone["name"],
        "layers": list(model.layers) if members else list(backbone["layers"]),
        "n_features": [m.channel_indices_.numel() for m in members] if members else backbone["n_features"],
        "weights": backbone["weights_id"],
        "image_size": _size(pre["image_size"]),
        "crop_size": _size(crop),
        "network_input": _size(crop if crop is not None else pre["image_size"]),
        "squash": pre.get("squash", False),
        "grid": _size(meta["grid"]),
        "pool": meta.get("pool", 1),
        "tiling": "none" if not tiling else f"tile {tiling['tile']}, overlap {tiling['overlap']}"
                                          + (", shared" if tiling.get("shared") else ""),
        "epsilon": meta["epsilon"],
        "blur_sigma": meta["blur_sigma"],
        "seed": meta["seed"],
        "factor_dtype": meta["factor_dtype"],
        "device": str(getattr(model, "device_", None) or getattr(model, "device", "")),  # resolved ("auto" → cpu)
    }
    components = getattr(model, "components_", None)
    if components is not None:  # PcaPadim: the Gaussians live on the projection, not on a channel subset
        settings["n_features"] = f"{components.shape[1]} (PCA of {backbone['n_features']} channels)"
    return settings


def model_file_settings(model, path) -> dict:
    """A shipped model's settings plus what it was fitted on and the threshold it ships with."""
    meta = model_metadata(model)
    threshold = meta.get("threshold") or {}
    return {
        "model": str(path),
        "fastpadim_version": meta.get("fastpadim_version"),
        **model_settings(model),
        "n_train_images": meta.get("n_train_images"),
        "threshold": threshold.get("image"),
        "threshold_target": threshold.get("target"),
    }
