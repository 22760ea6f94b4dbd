"""A model's name and version, and the files of its versions side by side.

A model file ``bottle.padim`` is version 1 of the model named ``bottle``; every fit or update adds one entry to
its ``history_``, so the version is the number of entries (a file from before histories counts as 1). An update
that keeps the old file writes the new one beside it as ``bottle.v2.padim``; ``serve`` finds the versions of a
model by these names and can switch between them (``POST /v1/model/reload``). The number in the file name is a
convenience: the version always comes from the file itself (an update in place makes bottle.padim version 2).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import FastpadimError

_VERSIONED = re.compile(r"^(?P<name>.+)\.v(?P<version>[1-9][0-9]*)$")


def model_name(path: str | Path) -> str:
    """``bottle`` for bottle.padim, bottle.v3.padim and bottle.onnx."""
    stem = Path(path).stem
    match = _VERSIONED.match(stem)
    return match["name"] if match else stem


def model_version(model) -> int:
    """The number of fits and updates the model has been through (1 for a file from before histories)."""
    return max(1, len(getattr(model, "history_", None) or []))


def versioned_path(path: str | Path, version: int) -> Path:
    """Where version ``version`` of the model in ``path`` lives: ``bottle.padim`` for 1, ``bottle.v2.padim``
    for 2, in the same folder and with the same suffix."""
    path = Path(path)
    if version < 1:
        raise FastpadimError(f"a model version is 1 or more, got {version}")
    name = model_name(path)
    return path.with_name(f"{name}{path.suffix}" if version == 1 else f"{name}.v{version}{path.suffix}")


def file_version(path: str | Path) -> int:
    """The version a model file holds (its history's length, at least 1), read from its metadata only (a .padim's
    safetensors header, an .onnx's properties): no tensor is loaded. FastpadimError when it is not a model file."""
    import json

    path = Path(path)
    try:
        if path.suffix.lower() == ".onnx":
            from .onnx_runtime import read_metadata

            meta = read_metadata(path)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                meta = json.loads((handle.metadata() or {})["fastpadim"])
    except FastpadimError:
        raise
    except Exception as exc:  # noqa: BLE001 - any way a file is not a model file is one line
        raise FastpadimError(f"{path}: not a fastpadim model file ({type(exc).__name__})") from None
    history = meta.get("history") if isinstance(meta, dict) else None
    return max(1, len(history)) if isinstance(history, list) else 1


def versions(path: str | Path) -> dict[int, Path]:
    """The version files of ``path``'s model found beside it, version → path, oldest first. Files are found by
    name (``bottle.padim``, ``bottle.vN.padim``); each one's version is the one it holds (``file_version``), which
    differs from its name after an update in place. A file that is not a readable model counts by its name (loading
it then says what is wrong with it)."""
    path = Path(path)
    name, found = model_name(path), {}
    for candidate in sorted(path.parent.glob(f"*{path.suffix}")):
        match = _VERSIONED.match(candidate.stem)
        if candidate.stem != name and not (match and match["name"] == name):
            continue
        named = int(match["version"]) if match and match["name"] == name else 1
        try:
            version = file_version(candidate)
        except FastpadimError:  # listed by its name: loading it says what is wrong with it
            found.setdefault(named, candidate)
            continue
        if version not in found or version == named:  # the file named for its version wins a tie
            found[version] = candidate
    return dict(sorted(found.items()))
