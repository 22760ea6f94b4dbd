"""What one scored image leaves behind, the same for ``predict`` and ``watch``: its results row (CSV/JSON), its
overlay and mask, and its ``Inspection`` for the records; and the run it belongs to (when, which model, which
threshold), which every row carries.

An image to be recorded is read once: its bytes are both digested (SHA-256, so the records can tell whether this
content was seen before) and decoded, so the digest is always that of what was scored.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import FastpadimError
from .files import atomic_write, os_reason
from .lineage import model_name, model_version
from .records.inspection import Inspection, utc_now
from .results import ScoredImage, verdict_label
from .sources import FRAME_MARK, Item, Skipped, load

# results.csv: one line per image; the run's columns come last, after the optional region count
IMAGE_COLUMNS = ["image", "score", "normalized", "false_alarm_probability", "verdict", "overlay", "mask"]
RUN_COLUMNS = ["run_time", "model", "model_version", "model_file", "threshold"]
MAX_DIGEST_BYTES = 1 << 30  # a file larger than this is left to the decoder by path (not read into memory)


def csv_columns(regions: bool = False) -> list[str]:
    return IMAGE_COLUMNS + (["regions"] if regions else []) + RUN_COLUMNS


@dataclass(frozen=True)
class Run:
    """What a run scores with, and when it started: written beside every verdict, so a row still says which model
    and threshold gave it once the model file has been updated."""

    time: datetime.datetime
    model: str  # lineage.model_name
    model_version: int
    model_file: str  # absolute
    threshold: float | None

    @classmethod
    def start(cls, model, model_path: str | os.PathLike) -> Run:
        return cls(utc_now(), model_name(model_path), model_version(model), os.path.abspath(model_path),
                   model.threshold_)

    def columns(self) -> dict:
        """The run's CSV columns."""
        return {"run_time": self.time.isoformat(), "model": self.model, "model_version": self.model_version,
                "model_file": self.model_file, "threshold": self.threshold}

    def to_json(self) -> dict:
        """The run's fields in results.json (``model`` there has always been the model file)."""
        return {"run_time": self.time.isoformat(), "model": self.model_file, "model_name": self.model,
                "model_version": self.model_version, "threshold": self.threshold}


def significant(value: float | None) -> float | None:
    """Significant digits, not decimals: a tail estimate can be 1e-9, and is not 0."""
    return None if value is None else float(f"{value:.6g}")


def readable(result: ScoredImage) -> dict:
    """The score as people read it, beside the raw one: ``normalized`` (score / threshold, 1.0 at the threshold) and
    ``false_alarm_probability`` (of a good part scoring this high); None (empty in the CSV) where the model has no
    threshold or no calibration."""
    return {"normalized": significant(result.normalized),
            "false_alarm_probability": significant(result.false_alarm_probability)}


def result_row(result: ScoredImage, name: str, threshold: float | None) -> dict:
    """A scored image's row of results.csv/json (without outputs and regions)."""
    return {"image": name, "score": round(result.score, 6), **readable(result),
            "verdict": verdict_label(result.score, threshold)}


def write_png(image, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FastpadimError(f"cannot write {path}: {os_reason(exc)}") from None
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_maps(result: ScoredImage, threshold: float | None, folder: Path, stem: Path) -> dict:
    """The overlay (``folder/overlays/stem``) and, with a threshold, the defect mask (``folder/masks/stem``) of an
    image scored with ``keep_view``; returns their file names relative to ``folder`` ({"overlay", "mask"})."""
    from .visualize import Label, defect_mask, overlay

    written = {"overlay": Path("overlays") / stem, "mask": None}
    write_png(overlay(result.view, result.frame_map, threshold, label=Label.of(result, threshold)),
              folder / written["overlay"])
    if threshold is not None:
        written["mask"] = Path("masks") / stem
        write_png(defect_mask(result.frame_map, threshold), folder / written["mask"])
    return written


def regions_of(result: ScoredImage, threshold: float | None) -> dict | None:
    """``regions.Regions.to_dict()`` of an image scored with ``keep_view`` (None without a threshold or map)."""
    if threshold is None or result.frame_map is None:
        return None
    from .regions import find_regions

    return find_regions(result.frame_map, threshold).to_dict()


def csv_text(rows: Iterable[dict], columns: list[str], header: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_for_scoring(path: str | os.PathLike) -> tuple[bytes | str, str | None]:
    """A file's bytes and their digest; the path itself (no digest) when it cannot be read or is too large to
    hold, so the decoder gives the reason in its usual words."""
    try:
        if os.path.getsize(path) > MAX_DIGEST_BYTES:
            return str(path), None
        data = Path(path).read_bytes()
    except OSError:
        return str(path), None
    return data, digest(data)


def read_once(items: Iterable[Item], skipped: Skipped, names: list[str], digests: list[str | None]) -> Iterator[object]:
    """``sources.inputs`` for a run that records: image files as their bytes (read once, their digest in
    ``digests``); video frames as decoded (no digest). ``names`` and ``digests`` follow the inputs' order."""
    for name, value in load(items, skipped):
        names.append(name)
        data, sha = read_for_scoring(value) if isinstance(value, str) else (value, None)
        digests.append(sha)
        yield data


def named_error(result: ScoredImage, name: str) -> str:
    """An error about an image given as bytes, in the words of one given by path: the decoder names bytes
    ``image`` (or ``<image N>``); the reader wants the file."""
    error = result.error or ""
    for label in (f"<image {result.index}>", "image"):
        if error.startswith(label + ": "):
            return name + error[len(label):]
    return error


def inspection(result: ScoredImage | None, run: Run, *, path: str, source: str, station: str, digest: str | None,
               image_path: str | None, overlay_path: str | None = None, regions: dict | None = None,
               timings_ms: dict | None = None, error: str | None = None) -> Inspection:
    """The records' entry for one scored image, or one that could not be scored (``error``, or ``result.error``;
    ``result`` may then be None)."""
    common = dict(path=path, source=source, station=station, model=run.model, model_version=run.model_version,
                  model_file=run.model_file, threshold=run.threshold, digest=digest, image_path=image_path,
                  timings_ms=timings_ms)
    reason = error or (result.error if result is not None else None)
    if reason:
        return Inspection(**common, verdict="error", error=reason)
    return Inspection(**common, verdict=verdict_label(result.score, run.threshold), score=float(result.score),
                      normalized=result.normalized, false_alarm_probability=result.false_alarm_probability,
                      regions=None if regions is None else regions["regions"], overlay_path=overlay_path)


class Recorder:
    """A run's verdicts on their way into the records (nothing without records): collected per batch and added
    together (``flush``), so a run cut short keeps what it scored. Paths are recorded absolute; a video frame
    (``v.mp4#frame=3``) has no file of its own to read again (``image_path`` None)."""

    def __init__(self, records, run: Run, source: str, station: str | None = None) -> None:
        self.records, self.run, self.source = records, run, source
        self.station = station or socket.gethostname()
        self.pending: list[Inspection] = []
        self.count = 0

    def add(self, result: ScoredImage | None, name: str, digest: str | None, *, error: str | None = None,
            overlay: str | None = None, regions: dict | None = None, timings_ms: dict | None = None) -> None:
        if self.records is None:
            return
        path = os.path.abspath(name)
        self.pending.append(inspection(
            result, self.run, path=path, source=self.source, station=self.station, digest=digest,
            image_path=None if FRAME_MARK in name else path, overlay_path=overlay and os.path.abspath(overlay),
            regions=regions, timings_ms=timings_ms, error=error))

    def errors(self, unreadable: Iterable[tuple[str, str]]) -> None:
        """Inputs that never reached the decoder (an unreadable video, a corrupt frame): (name, reason)."""
        for name, reason in unreadable:
            self.add(None, name, None, error=reason)

    def flush(self) -> list[int]:
        if self.records is None or not self.pending:
            return []
        ids = self.records.add_many(self.pending)
        self.count += len(self.pending)
        self.pending = []
        return ids

    def close(self) -> None:
        """Add what is pending, then close the records."""
        if self.records is not None:
            try:
                self.flush()
            finally:
                self.records.close()
