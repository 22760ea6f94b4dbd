"""A model's name and version, and the files of its versions side by side.

A model file ``bottle.padim`` is version 1 of the model named ``bottle``; every fit or update adds one entry to
its ``history_``, so the version is the number of entries (a file from before histories counts as 1). An update
that keeps the old file writes the new one beside it as ``bottle.v2.padim``; ``serve`` finds the versions of a
model by these names and can switch between them (``POST /v1/model/reload``). The name in the file name is a
convenience: the version always comes from the file itself.
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


def versions(path: str | Path) -> dict[int, Path]:
    """The version files of ``path``'s model found beside it (by name), version → path, oldest first."""
    path = Path(path)
    name, found = model_name(path), {}
    for candidate in path.parent.glob(f"*{path.suffix}"):
        if candidate.stem == name:
            found[1] = candidate
            continue
        match = _VERSIONED.match(candidate.stem)
        if match and match["name"] == name:
            found[int(match["version"])] = candidate
    return dict(sorted(found.items()))
