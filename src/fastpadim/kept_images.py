"""Copies of inspected images that ``fastpadim serve`` keeps for operators to review, within a size and an age.

Flagged images are always kept; passed ones (and those without a verdict: no threshold) are sampled at random.
A copy is the bytes as uploaded, at ``folder/YYYY-MM-DD/<sha256[:16]>.<ext>`` (the extension from the image's
format, never from the upload's name), written atomically so a reader never sees half a file. Retention deletes
the oldest files first: all older than ``max_days``, then more until the folder holds at most ``max_mb``.
"""

from __future__ import annotations

import io
import mimetypes
import os
import random
import re
import threading
import time
from pathlib import Path

from .errors import FastpadimError
from .files import atomic_write, os_reason

EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif", "JPEG2000": "jp2"}  # else the format's name in lower case
PRUNE_EVERY_S = 3600.0  # age-based deletion at least this often, size-based as soon as the limit is passed
# Only files of this shape are the keep folder's own: retention never counts or deletes anything else that lies
# there (the folder may be shared with models or camera folders).
DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
KEPT_FILE = re.compile(r"^[0-9a-f]{16}\.[a-z0-9]+$")


def image_extension(data: bytes) -> str:
    """The extension of the image format in ``data`` (read from its header); "bin" when Pillow knows none."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or ""
    except Exception:  # noqa: BLE001 - unreadable bytes are still kept as they came
        return "bin"
    return EXTENSIONS.get(fmt, fmt.lower() or "bin")


def media_type(path: str | Path) -> str:
    return mimetypes.guess_type(Path(path).name)[0] or "application/octet-stream"


class KeptImages:
    """The keep folder of one service. ``keep`` and ``prune`` are safe to call from several threads."""

    def __init__(self, folder: str | os.PathLike, keep_passed: float = 0.05, max_mb: float = 1024.0,
                 max_days: float = 30.0, rng: random.Random | None = None):
        if not 0 <= keep_passed <= 1:
            raise FastpadimError(f"--keep-passed must be between 0 and 1, got {keep_passed}")
        if not 0 < max_mb < float("inf"):
            raise FastpadimError(f"--keep-max-mb must be > 0, got {max_mb}")
        if not 0 < max_days < float("inf"):
            raise FastpadimError(f"--keep-days must be > 0, got {max_days}")
        self.folder = Path(folder).resolve()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FastpadimError(f"cannot create the keep folder {self.folder}: {os_reason(exc)}") from None
        self.keep_passed, self.max_bytes, self.max_age_s = keep_passed, int(max_mb * 2**20), max_days * 86400.0
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self._bytes = sum(size for _, _, size in self._files())
        self._pruned_at = float("-inf")

    def wanted(self, verdict: str) -> bool:
        """Whether an image with this verdict is kept: always when flagged, by chance when passed or unknown, never
        when it could not be scored (verdict "error")."""
        if verdict == "anomalous":
            return True
        return verdict in ("good", "unknown") and self.rng.random() < self.keep_passed

    def keep(self, data: bytes, digest: str, when: time.struct_time | None = None) -> Path:
        """Write ``data`` (whose SHA-256 is ``digest``) to the day's folder; the same bytes the same day are one file."""
        day = self.folder / time.strftime("%Y-%m-%d", when or time.gmtime())
        path = day / f"{digest[:16]}.{image_extension(data)}"
        with self._lock:
            if path.exists():
                return path
            try:
                day.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FastpadimError(f"cannot write {path}: {os_reason(exc)}") from None
            atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))
            self._bytes += len(data)
        return path

    def contains(self, path: str | os.PathLike | None) -> Path | None:
        """``path`` resolved, when it is a file inside the keep folder (else None: never serve anything else)."""
        if not path:
            return None
        resolved = Path(path).resolve()
        return resolved if resolved.is_relative_to(self.folder) and resolved.is_file() else None

    def due(self) -> bool:
        return self._bytes > self.max_bytes or time.monotonic() - self._pruned_at > PRUNE_EVERY_S

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete files older than the age limit, then the oldest until the size limit holds; returns them."""
        now = time.time() if now is None else now
        deleted = []
        with self._lock:
            files = sorted(self._files())  # oldest first
            total = sum(size for _, _, size in files)
            for modified, path, size in files:
                if now - modified <= self.max_age_s and total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
                deleted.append(path)
            for day in {path.parent for path in deleted}:
                try:
                    day.rmdir()  # only once empty: another service sharing the folder may be writing there
                except OSError:
                    pass
            self._bytes, self._pruned_at = total, time.monotonic()
        return deleted

    def _files(self) -> list[tuple[float, Path, int]]:
        """The kept copies (day folders of kept files only), tolerating files that another process deletes."""
        found = []
        for day in self.folder.iterdir():
            if not (DAY_FOLDER.match(day.name) and day.is_dir()):
                continue
            try:
                entries = list(day.iterdir())
            except FileNotFoundError:  # emptied and removed by another service meanwhile
                continue
            for path in entries:
                if not KEPT_FILE.match(path.name):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, path, stat.st_size))
        return found
