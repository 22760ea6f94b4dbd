"""The typed schema of a model's metadata (``.padim`` and ``.onnx``), checked before anything is built from it.

A model file comes from outside: every field is checked for its type and bounds here, so a hostile or damaged
file is refused with one line that names the field, instead of allocating what it asks for or producing NaN.
Limits that bound memory (image size, channels, layers) are stated as constants. NumPy-free and torch-free.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path

from .errors import FastpadimError

MAX_IMAGE_SIZE = 8192  # network input side (height or width) in pixels; PaDiM's state grows with the area
MAX_POOL = 8  # embedding positions averaged per side
MIN_IMAGE_SIZE = 32
MAX_FEATURES = 4096  # embedding channels D (WR50 has 1792 in all)
MAX_LAYERS = 8
MAX_LAYER_INDEX = 32
MAX_BLUR_SIGMA = 64.0
MAX_EPSILON = 1e6
MIN_STRIDE, MAX_STRIDE = 2, 32  # the first used map's stride: input side / grid side
FACTOR_DTYPES = ("float32", "float16", "bfloat16")
MAX_FOLDS = 100
MAX_SCORES = 100_000  # good scores a calibration keeps (the metadata stays a few MB)
CALIBRATION_METHODS = ("out-of-fold", "hold-out", "good images", "labelled")
MAX_HISTORY = 10_000  # fits and updates recorded
_TARGET = re.compile(r"^(fpr=[0-9.eE+-]{1,24}|recall=[0-9.eE+-]{1,24}|f1|manual)$")


def history_entry(images: int, digest: str, kind: str = "sha256") -> dict:
    """One fit or update as a model records it: version, UTC date, images added, digest of the inputs as seen
    (``kind`` sha256: of the network's input pixels, in order)."""
    from . import __version__

    return {"fastpadim_version": __version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "images": int(images), "digest": f"{kind}:{digest}"}


_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")  # timm names and tags (no paths, no URLs)


def shown(value) -> str:
    """A value from the file, as repr, cut short: a hostile 100 KB string must not become a 100 KB error line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse_field(path, field: str, problem: str):
    """One line naming the bad field (``section.field``)."""
    raise FastpadimError(f"{path}: model metadata field '{field}' {problem}")


def _get(path, section: dict, field: str, prefix: str = ""):
    if not isinstance(section, dict):
        refuse_field(path, prefix.rstrip(".") or "metadata", "is not a JSON object")
    if field not in section:
        refuse_field(path, prefix + field, "is missing")
    return section[field]


def _int(path, section, field, low, high, prefix="", optional=False) -> int | None:
    value = _get(path, section, field, prefix)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        refuse_field(path, prefix + field, f"must be an integer, got {shown(value)}")
    if not low <= value <= high:
        refuse_field(path, prefix + field, f"must be between {low} and {high}, got {value}")
    return value


def _size(path, section, field, within, prefix="", optional=False) -> tuple[int, int] | None:
    """A size: an int (a square) or [height, width], each side from MIN_IMAGE_SIZE up to ``within``'s."""
    value = _get(path, section, field, prefix)
    if value is None and optional:
        return None
    sides = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(sides, list) or len(sides) != 2:
        refuse_field(path, prefix + field, f"must be an integer or [height, width], got {shown(value)}")
    return tuple(_int(path, {f"{field}[{i}]": sides[i]}, f"{field}[{i}]", MIN_IMAGE_SIZE, within[i], prefix)
                 for i in range(2))


def _float(path, section, field, low, high, prefix="", optional=False, open_low=False) -> float | None:
    value = _get(path, section, field, prefix)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        refuse_field(path, prefix + field, f"must be a finite number, got {shown(value)}")
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        refuse_field(path, prefix + field, f"must lie in {bracket}{low}, {high}], got {value}")
    return float(value)


def _name(path, section, field, prefix="") -> str:
    value = _get(path, section, field, prefix)
    if not isinstance(value, str) or not _NAME.match(value):
        refuse_field(path, prefix + field, f"must be a model name (letters, digits, '_', '.', '-'), got {shown(value)}")
    return value


def _triple(path, section, field, low, high, prefix="", open_low=False) -> list[float]:
    value = _get(path, section, field, prefix)
    if not isinstance(value, list) or len(value) != 3:
        refuse_field(path, prefix + field, f"must be a list of 3 numbers, got {shown(value)}")
    for i in range(3):
        _float(path, {f"{field}[{i}]": value[i]}, f"{field}[{i}]", low, high, prefix, open_low=open_low)
    return [float(v) for v in value]


def validate(meta, path: str | Path = "model") -> dict:
    """Check every field a model's metadata must have (the ``.padim`` schema, shared by ONNX exports);
    returns ``meta`` unchanged, or raises FastpadimError naming the first bad field."""
    if not isinstance(meta, dict):
        raise FastpadimError(f"{path}: model metadata is not a JSON object")
    if not isinstance(meta.get("fastpadim_version", ""), str):
        refuse_field(path, "fastpadim_version", "must be a string")

    bb = _get(path, meta, "backbone")
    p = "backbone."
    _name(path, bb, "name", p)
    _name(path, bb, "timm_name", p)
    layers = _get(path, bb, "layers", p)
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        refuse_field(path, p + "layers", f"must be a list of 1 to {MAX_LAYERS} layer indices, got {shown(layers)}")
    for i in range(len(layers)):
        _int(path, {f"layers[{i}]": layers[i]}, f"layers[{i}]", 0, MAX_LAYER_INDEX, p)
    if not isinstance(bb.get("extra_blocks", False), bool):
        refuse_field(path, p + "extra_blocks", f"must be true or false, got {shown(bb['extra_blocks'])}")
    _int(path, bb, "n_features", 1, MAX_FEATURES, p)
    weights_id = _get(path, bb, "weights_id", p)
    if not isinstance(weights_id, str) or not weights_id or len(weights_id) > 300:
        refuse_field(path, p + "weights_id", f"must be a non-empty string, got {shown(weights_id)}")

    pre = _get(path, meta, "preprocessing")
    p = "preprocessing."
    size = _size(path, pre, "image_size", (MAX_IMAGE_SIZE, MAX_IMAGE_SIZE), p)
    crop = _size(path, pre, "crop_size", size, p, optional=True)
    _triple(path, pre, "mean", -10.0, 10.0, p)
    _triple(path, pre, "std", 0.0, 10.0, p, open_low=True)  # std 0 would divide by zero: NaN inputs
    if not isinstance(pre.get("squash", False), bool):
        refuse_field(path, p + "squash", f"must be true or false, got {shown(pre['squash'])}")

    grid = _get(path, meta, "grid")
    if not isinstance(grid, list) or len(grid) != 2:
        refuse_field(path, "grid", f"must be [height, width], got {shown(grid)}")
    pool = _int(path, {"pool": meta.get("pool", 1)}, "pool", 1, MAX_POOL)
    network = crop or size
    for i in range(2):
        side = network[i]
        cells = _int(path, {f"grid[{i}]": grid[i]}, f"grid[{i}]", 1, side)
        if not MIN_STRIDE <= side / cells <= MAX_STRIDE * pool:
            refuse_field(path, f"grid[{i}]", f"= {cells} does not fit {side} px inputs (stride {side / cells:.3g})")
    tiling = meta.get("tiling")
    if tiling is not None:
        t = "tiling."
        tile = _int(path, tiling, "tile", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, t)
        _int(path, tiling, "overlap", 0, tile - 1, t)
        if not isinstance(tiling.get("shared", False), bool):
            refuse_field(path, t + "shared", f"must be true or false, got {shown(tiling['shared'])}")
    # a tiled model's Gaussians: tiles overlap by less than a tile, so they hold under 4x the frame's positions
    cells = grid[0] * grid[1]
    positions = _int(path, {"positions": meta.get("positions", cells)}, "positions", 1,
                     cells if tiling is None else 4 * cells)
    meta["positions"] = positions

    _float(path, meta, "epsilon", 0.0, MAX_EPSILON)
    _float(path, meta, "blur_sigma", 0.0, MAX_BLUR_SIGMA)
    _int(path, meta, "seed", 0, 2**63 - 1)
    if _get(path, meta, "factor_dtype") not in FACTOR_DTYPES:
        refuse_field(path, "factor_dtype", f"must be one of {', '.join(FACTOR_DTYPES)}, got {shown(meta['factor_dtype'])}")
    _int(path, meta, "n_train_images", 1, 2**53)

    th = _get(path, meta, "threshold")
    p = "threshold."
    _float(path, th, "image", -math.inf, math.inf, p, optional=True)
    _float(path, th, "false_alarm_rate", 0.0, 1.0, p, open_low=True)
    if th["false_alarm_rate"] == 1.0:
        refuse_field(path, p + "false_alarm_rate", "must be below 1")
    _int(path, {"n_good_images": th.get("n_good_images")}, "n_good_images", 1, 2**53, p, optional=True)
    _int(path, {"n_train_images": th.get("n_train_images")}, "n_train_images", 1, 2**53, p, optional=True)
    target = th.get("target")
    if target is not None and (not isinstance(target, str) or not _TARGET.match(target)):
        refuse_field(path, p + "target", f"must be fpr=R, recall=R, f1 or manual, got {shown(target)}")
    if not isinstance(th.get("extrapolated", False), bool):
        refuse_field(path, p + "extrapolated", f"must be true or false, got {shown(th['extrapolated'])}")
    if meta.get("folds", 0) != "all":
        _int(path, {"folds": meta.get("folds", 0)}, "folds", 0, MAX_FOLDS)
    _calibration(path, meta.get("calibration"))
    _history(path, meta.get("history"))
    return meta


def _calibration(path, calibration) -> None:
    """Good scores (bounded in count, finite) and the tail model fitted to them."""
    if calibration is None:
        return
    p = "calibration."
    if _get(path, calibration, "method", p) not in CALIBRATION_METHODS:
        refuse_field(path, p + "method", f"must be one of {', '.join(CALIBRATION_METHODS)}, got {shown(calibration['method'])}")
    if calibration.get("folds") != "all":
        _int(path, {"folds": calibration.get("folds")}, "folds", 2, MAX_FOLDS, p, optional=True)
    scores = _get(path, calibration, "scores", p)
    if not isinstance(scores, list) or not 1 <= len(scores) <= MAX_SCORES:
        refuse_field(path, p + "scores", f"must be a list of 1 to {MAX_SCORES} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores):
        refuse_field(path, p + "scores", "must hold only finite numbers")
    tail = calibration.get("tail")
    if tail is not None:
        t = p + "tail."
        _float(path, tail, "start", -1e30, 1e30, t)
        _float(path, tail, "shape", -1e3, 1e3, t)
        _float(path, tail, "scale", 0.0, 1e30, t, open_low=True)
        _float(path, tail, "share", 0.0, 1.0, t, open_low=True)


def _history(path, history) -> None:
    """One entry per fit and update: version, date, image count, digest of the inputs."""
    if history is None:
        return
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        refuse_field(path, "history", f"must be a list of at most {MAX_HISTORY} entries")
    for i, entry in enumerate(history):
        p = f"history[{i}]."
        for field in ("fastpadim_version", "date", "digest"):
            value = _get(path, entry, field, p)
            if not isinstance(value, str) or len(value) > 100:
                refuse_field(path, p + field, f"must be a short string, got {shown(value)}")
        _int(path, entry, "images", 0, 2**53, p)
        _history_records(path, entry.get("records"), p + "records")


MAX_RECORDED_IDS = 1_000_000  # inspection ids one update took from the records


def _history_records(path, records, p) -> None:
    """Where an update's images came from (``update --from-records``): the records and the inspection ids."""
    if records is None:
        return
    if not isinstance(records, dict) or not isinstance(records.get("db"), str) or len(records["db"]) > 2000:
        refuse_field(path, p, "must be {db: text, inspections: [ids]}")
    ids = records.get("inspections")
    if not isinstance(ids, list) or len(ids) > MAX_RECORDED_IDS or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids):
        refuse_field(path, p + ".inspections", f"must be a list of at most {MAX_RECORDED_IDS} inspection ids")
