"""Operators' labels as data: the images of labelled inspections, for ``update`` (false alarms become good images)
and ``calibrate`` (false alarms and confirmed defects become labelled scores).

An inspection's image is used only if it is still the one the operator labelled: its bytes are read once and
their SHA-256 must match the digest recorded with the verdict. A moved, deleted or rewritten file is skipped with
the inspection's id and the reason, never learned from. The bytes that were checked are the bytes handed to the
model (no second read of the file that could see other content).

An update records the inspections it learned from in its history entry (``records``: the database and the
inspection ids), so a later update from the same records does not learn them twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FastpadimError
from .files import os_reason
from .recording import MAX_DIGEST_BYTES, digest
from .records.inspection import Inspection

# a calibrate score and a model's good score of the same image: equal on one engine, the fifth digit apart across
# engines (ONNX against PyTorch)
SAME_SCORE_RTOL = 1e-4


@dataclass(frozen=True)
class LabelledImage:
    """A labelled inspection and its image's bytes, checked against the recorded digest."""

    inspection: Inspection
    data: bytes

    @property
    def id(self) -> int:
        return self.inspection.id


@dataclass
class Selection:
    """The usable images of one label, oldest first; the inspections left out, as (id, reason) in their order;
    how many were learned before (an earlier update)."""

    images: list[LabelledImage] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    learned_before: int = 0

    def skip_lines(self) -> list[tuple[str, str]]:
        """``skipped`` as the command line reports unreadable inputs: (name, reason naming the inspection)."""
        return [(f"inspection {id_}", f"inspection {id_}: {why}") for id_, why in self.skipped]


def database_name(target: str | os.PathLike, shown: str) -> str:
    """What a model's history calls the records: a SQLite file by its absolute path, however it was named (a path
    or a sqlite:/// URL, from any working folder), another database as ``Records.url`` shows it (``shown``: its
    password masked)."""
    from .records.store import database_url

    url = database_url(target)
    return str(Path(url.database).resolve()) if url.get_backend_name() == "sqlite" else shown


def learned_inspections(history: list, database: str) -> set[int]:
    """The inspections of ``database`` that earlier updates learned (their history entries' ``records``). Read
    defensively: an entry that is not of that shape (a hand-edited file) adds nothing."""
    learned: set[int] = set()
    for entry in history or []:
        records = entry.get("records") if isinstance(entry, dict) else None
        if not isinstance(records, dict) or records.get("db") != database:
            continue
        ids = records.get("inspections")
        if isinstance(ids, list):
            learned.update(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
    return learned


def records_entry(database: str, ids: list[int]) -> dict:
    """The ``records`` part of an update's history entry."""
    return {"db": database, "inspections": sorted(int(i) for i in ids)}


def read_checked(inspection: Inspection) -> bytes:
    """The bytes of the inspection's image, if they are still those the verdict was given for; else one line why."""
    if not inspection.image_path:
        raise FastpadimError("no image kept (deleted by retention, or never kept)")
    if not inspection.digest:
        raise FastpadimError(f"{inspection.image_path}: no digest was recorded, so it cannot be checked")
    path = Path(inspection.image_path)
    try:
        if path.stat().st_size > MAX_DIGEST_BYTES:
            raise FastpadimError(f"{path}: larger than {MAX_DIGEST_BYTES >> 20} MB")
        data = path.read_bytes()
    except FileNotFoundError:
        raise FastpadimError(f"{path}: the file is gone") from None
    except IsADirectoryError:
        raise FastpadimError(f"{path}: is a folder now") from None
    except OSError as exc:
        raise FastpadimError(f"{path}: cannot be read: {os_reason(exc)}") from None
    if digest(data) != inspection.digest.lower():
        raise FastpadimError(f"{path}: changed since the verdict (its SHA-256 no longer matches the records)")
    return data


def labelled_images(records, label: str, model: str, learned: set[int] = frozenset()) -> Selection:
    """The images of the inspections of ``model`` labelled ``label`` that can be used, oldest first: not learned
    before (ids in ``learned``), scored (not an error verdict), their file unchanged, and not the same bytes as an
    earlier one (the same image sent twice counts once)."""
    selection, digests = Selection(), {}
    for inspection in records.labelled(label, model=model):
        if inspection.id in learned:
            selection.learned_before += 1
            continue
        if inspection.verdict == "error":
            selection.skipped.append((inspection.id, f"{inspection.path}: was not scored ({inspection.error})"))
            continue
        try:
            data = read_checked(inspection)
        except FastpadimError as exc:
            selection.skipped.append((inspection.id, str(exc)))
            continue
        key = inspection.digest.lower()
        if key in digests:
            same = f"{inspection.image_path}: the same image as inspection {digests[key]}"
            selection.skipped.append((inspection.id, same))
            continue
        digests[key] = inspection.id
        selection.images.append(LabelledImage(inspection, data))
    return selection


def counted_once(known, new) -> np.ndarray:
    """The ``known`` good scores less one for each score in ``new`` that is among them: an earlier
    ``calibrate`` put the same labelled images into the model's good scores, and a good image counts once."""
    known = np.sort(np.asarray(known, np.float64))
    keep = np.ones(len(known), bool)
    for score in np.asarray(new, np.float64):
        close = np.flatnonzero(keep & np.isclose(known, score, rtol=SAME_SCORE_RTOL, atol=0.0))
        if len(close):
            keep[close[np.argmin(np.abs(known[close] - score))]] = False
    return known[keep]
