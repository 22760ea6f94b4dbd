"""Scoring images as they arrive in a folder (``fastpadim watch``): the camera PC writes files, the watcher scores
each one once, records its verdict, and keeps going.

A file is read only once it is completely written: its size and modification time unchanged for ``settle``
seconds; one still growing is looked at again, never scored half. Temporary names (dotfiles, ``*.tmp``,
``*.part``, ``*.partial``, ``*~``) are ignored, so a writer that renames a finished file into the folder is seen
when the final name appears. Before a file is scored the records are asked whether this content at this path was
recorded before (by ``watch``, ``predict`` or ``serve``): a restart scores only what is new. A file that cannot be
decoded is recorded once as an error (with the digest of its bytes) and then counts as seen like any other.

Files are events from ``watchfiles`` plus one scan of what the folder already holds; a symlink that leads out of
the folder is not followed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FastpadimError
from .files import make_output_folder, output_name
from .images import IMAGE_SUFFIXES
from .recording import (
    MAX_DIGEST_BYTES, Recorder, Run, csv_columns, csv_text, digest, named_error, regions_of, result_row,
    write_maps,
)
from .results import verdict_label

TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
DEFAULT_SETTLE = 0.5
MAX_REMEMBERED = 100_000  # files processed in this run kept in memory (to skip re-reading them on later events)
Signature = tuple[int, int]  # (size, mtime in ns): a file whose signature stays the same is no longer being written


def is_temporary(name: str) -> bool:
    """A name writers use while a file is not finished (or an editor's backup): never scored."""
    lower = name.lower()
    return name.startswith(".") or name.endswith("~") or lower.endswith(TEMPORARY_SUFFIXES)


@dataclass
class Counts:
    """What the watcher has done so far: the live status line and the summary at the end."""

    scored: int = 0
    anomalous: int = 0
    unreadable: int = 0
    already: int = 0  # recorded before (an earlier run, or another scorer): not scored again
    skipped: int = 0  # never read: links out of the folder, names that are not UTF-8
    busy_s: float = 0.0  # time spent reading and scoring
    last: str | None = None  # "img_0120.png good 0.42x"
    started: float = field(default_factory=time.monotonic)

    @property
    def processed(self) -> int:
        """Images scored or recorded as unreadable in this run."""
        return self.scored + self.unreadable

    def rate(self) -> float:
        """Images per second while working (waiting for files does not count)."""
        return self.processed / self.busy_s if self.busy_s > 0 else 0.0

    def line(self) -> str:
        text = f"scored {self.scored} ({self.anomalous} anomalous, {self.unreadable} unreadable)"
        if self.processed:
            text += f" · {self.rate():.1f} images/s"
        if self.already:
            text += f" · {self.already} already recorded"
        if self.last:
            text += f" · last: {self.last}"
        return text

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        extra = "".join([f", {self.already} already recorded" if self.already else "",
                         f", {self.skipped} skipped" if self.skipped else ""])
        rate = f" at {self.rate():.1f} images/s" if self.processed else ""
        return (f"watched for {elapsed:.1f} s: scored {self.scored} images ({self.anomalous} anomalous, "
                f"{self.unreadable} unreadable){extra}{rate}")


@dataclass
class _Pending:
    """A file seen but not yet read: its signature and since when it has been unchanged."""

    signature: Signature | None = None
    since: float = 0.0


class Watcher:
    """Scores the images that arrive in ``folder`` with ``model`` and records each verdict in ``records``.

    ``run(stop_event)`` watches until the event is set (or ``stop_after`` images were processed, or nothing
    happened for ``idle_exit`` seconds); ``scan_once()`` scores what the folder holds now and returns. With
    ``output`` each image's overlay (and mask) is written there and its row appended to ``output/results.csv``
    (the columns of ``predict``'s). ``notify`` gets one line per file left aside (a link out of the folder, an
    unreadable image); ``on_progress`` gets the counts after every batch."""

    def __init__(self, model, folder: str | os.PathLike, records, *, model_path: str | os.PathLike,
                 station: str | None = None, settle: float = DEFAULT_SETTLE, recursive: bool = False,
                 output: str | os.PathLike | None = None, batch_size: int = 8, stop_after: int | None = None,
                 idle_exit: float | None = None, force_polling: bool = False,
                 notify: Callable[[str], None] | None = None,
                 on_progress: Callable[[Counts], None] | None = None) -> None:
        self.folder = Path(os.path.abspath(folder))
        if not self.folder.is_dir():
            raise FastpadimError(f"{folder}: no such folder")
        if not settle >= 0 or settle == float("inf"):
            raise FastpadimError(f"--settle must be a number of seconds >= 0, got {settle}")
        if batch_size < 1:
            raise FastpadimError(f"batch size must be at least 1, got {batch_size}")
        if stop_after is not None and stop_after < 1:
            raise FastpadimError(f"--stop-after must be at least 1, got {stop_after}")
        if idle_exit is not None and not idle_exit > 0:
            raise FastpadimError(f"--idle-exit must be a number of seconds > 0, got {idle_exit}")
        self.model, self.records = model, records
        self.settle, self.recursive, self.batch_size = settle, recursive, batch_size
        self.stop_after, self.idle_exit, self.force_polling = stop_after, idle_exit, force_polling
        self.notify = notify or (lambda line: None)
        self.on_progress = on_progress or (lambda counts: None)
        self.run_info = Run.start(model, model_path)
        self.recorder = Recorder(records, self.run_info, "watch", station)
        self.output = Path(os.path.abspath(output)) if output is not None else None
        if self.output is not None:
            self._prepare_output()
        self.counts = Counts()
        self.pending: dict[Path, _Pending] = {}
        self.done: dict[Path, Signature] = {}  # processed in this run, as they were then
        self.left_aside: set[Path] = set()  # reported once
        self.last_activity = time.monotonic()
        self._real_folder = os.path.realpath(self.folder)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, stop_event: threading.Event | None = None) -> Counts:
        """Watch the folder until ``stop_event`` is set (or ``stop_after``/``idle_exit`` end it); the folder's
        existing files are scanned once, after the watch has started (so nothing written meanwhile is missed)."""
        import watchfiles

        stop = stop_event or threading.Event()
        poll_ms = int(min(500, max(50, self.settle * 1000 / 4)))
        scanned = False
        for changes in watchfiles.watch(self.folder, watch_filter=None, debounce=2 * poll_ms, step=50,
                                        stop_event=stop, rust_timeout=poll_ms, yield_on_timeout=True,
                                        raise_interrupt=False, recursive=self.recursive,
                                        force_polling=self.force_polling or None, ignore_permission_denied=True):
            if not scanned:
                self.scan_existing()
                scanned = True
            for change, path in changes:
                if change == watchfiles.Change.deleted:
                    self.pending.pop(Path(path), None)
                    self.done.pop(Path(path), None)
                else:
                    self.note(path)
            self.step(stop)
            if stop.is_set() or self._finished():
                break
        return self.counts

    def scan_once(self, stop_event: threading.Event | None = None) -> Counts:
        """Score what the folder holds now (waiting for files still being written to settle), then return."""
        stop = stop_event or threading.Event()
        self.scan_existing()
        while self.pending and not stop.is_set() and not self._reached_limit():
            self.step(stop)
            if self.pending:
                stop.wait(min(0.1, max(self.settle / 4, 0.01)))
        return self.counts

    def step(self, stop: threading.Event | None = None) -> int:
        """Look at the pending files once; read and score those that have settled. Returns how many were
        processed (scored or recorded as unreadable)."""
        before = self.counts.processed
        ready = self._settled(time.monotonic())
        for start in range(0, len(ready), self.batch_size):
            if (stop is not None and stop.is_set()) or self._reached_limit():
                break
            chunk = ready[start:start + self.batch_size]
            if self.stop_after is not None:
                chunk = chunk[:self.stop_after - self.counts.processed]
            self._score(self._read(chunk))
        if self.counts.processed != before:
            self.last_activity = time.monotonic()
        return self.counts.processed - before

    def _reached_limit(self) -> bool:
        return self.stop_after is not None and self.counts.processed >= self.stop_after

    def _finished(self) -> bool:
        idle = (self.idle_exit is not None and not self.pending
                and time.monotonic() - self.last_activity >= self.idle_exit)
        return self._reached_limit() or idle

    # ---------------------------------------------------------------------------------- which files
    def scan_existing(self) -> None:
        """Note every image file the folder holds now (its sub-folders too with ``recursive``; links to
        folders are not entered)."""
        for path in self._walk():
            self.note(path)

    def _walk(self) -> Iterator[Path]:
        if not self.recursive:
            with os.scandir(self.folder) as entries:
                yield from (Path(e.path) for e in entries if not e.is_dir(follow_symlinks=False))
            return
        for root, dirs, files in os.walk(self.folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not is_temporary(d))
            yield from (Path(root) / name for name in sorted(files))

    def note(self, path: str | os.PathLike) -> None:
        """A file that appeared or changed: looked at until it has settled (if it is an image to score)."""
        path = Path(path)
        if not self._wanted(path) or path in self.pending:
            return
        try:
            str(path).encode("utf-8")  # the records keep names as text
        except UnicodeEncodeError:
            self._leave_aside(path, "the file name is not valid UTF-8: not scored")
            return
        self.pending[path] = _Pending()
        self.last_activity = time.monotonic()

    def _wanted(self, path: Path) -> bool:
        """An image file inside the folder (directly, unless ``recursive``), not a temporary name, not in the
        output folder."""
        relative = os.path.relpath(path, self.folder)
        parts = Path(relative).parts
        if relative.startswith("..") or os.path.isabs(relative) or not parts:
            return False
        if len(parts) > 1 and not self.recursive:
            return False
        if any(is_temporary(part) for part in parts) or path.suffix.lower() not in IMAGE_SUFFIXES:
            return False
        return self.output is None or not path.is_relative_to(self.output)

    def _leave_aside(self, path: Path, reason: str) -> None:
        self.pending.pop(path, None)
        if path not in self.left_aside:
            self.left_aside.add(path)
            self.counts.skipped += 1
            shown = str(path).encode("utf-8", "backslashreplace").decode("utf-8")  # a name may not be UTF-8
            self.notify(f"{shown}: {reason}")

    def _settled(self, now: float) -> list[Path]:
        """The pending files whose size and modification time have not changed for ``settle`` seconds."""
        ready = []
        for path, state in list(self.pending.items()):
            try:
                stat = path.stat()
            except FileNotFoundError:
                self.pending.pop(path, None)  # gone (renamed away, deleted)
                continue
            except OSError as exc:
                self._leave_aside(path, f"cannot be read ({exc.strerror or exc})")
                continue
            # a link (the file, or a folder on its way) may lead anywhere: only what lies in the folder is read
            if os.path.commonpath([self._real_folder, os.path.realpath(path)]) != self._real_folder:
                self._leave_aside(path, "a link that leads out of the watched folder: not followed")
                continue
            if not os.path.isfile(path):
                self.pending.pop(path, None)
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if self.done.get(path) == signature:
                self.pending.pop(path, None)  # processed in this run and unchanged since
            elif signature != state.signature:
                state.signature, state.since = signature, now
            elif now - state.since >= self.settle:
                ready.append(path)
        return ready

    # ------------------------------------------------------------------------------ reading, scoring
    def _read(self, paths: list[Path]) -> list[tuple[Path, bytes | None, str, str | None, float]]:
        """(path, bytes, digest, error, read seconds) of each settled file not recorded before; a file that changed
        while it was read goes back to waiting."""
        read = []
        for path in paths:
            start = time.perf_counter()
            state = self.pending[path]
            try:
                if state.signature[0] > MAX_DIGEST_BYTES:
                    with open(path, "rb") as handle:
                        sha = hashlib.file_digest(handle, "sha256").hexdigest()
                    data, error = None, (f"{path}: {state.signature[0] / 2**30:.1f} GiB is too large a file for "
                                         f"an image (the limit is {MAX_DIGEST_BYTES / 2**30:.0f} GiB)")
                else:
                    data = path.read_bytes()
                    sha, error = digest(data), None
                stat = path.stat()
            except FileNotFoundError:
                self.pending.pop(path, None)
                continue
            except OSError as exc:
                self._leave_aside(path, f"cannot be read ({exc.strerror or exc})")
                continue
            if (stat.st_size, stat.st_mtime_ns) != state.signature or (data is not None and len(data) != stat.st_size):
                state.signature = None  # written to while read: wait for it to settle again
                continue
            del self.pending[path]
            self.done[path] = (stat.st_size, stat.st_mtime_ns)
            if len(self.done) > MAX_REMEMBERED:  # the oldest: should it change again, the records tell
                del self.done[next(iter(self.done))]
            if self.records.seen(str(path), sha):
                self.counts.already += 1
                continue
            read.append((path, data, sha, error, time.perf_counter() - start))
        return read

    def _score(self, read: list[tuple[Path, bytes | None, str, str | None, float]]) -> None:
        if not read:
            return
        start = time.perf_counter()
        threshold = self.run_info.threshold
        scorable = [entry for entry in read if entry[1] is not None]
        rows = []
        for path, _, sha, error, read_s in read:  # too large to read: recorded, never decoded
            if error:
                self._unreadable(None, path, sha, error, {"read": round(read_s * 1000, 3)})
        if scorable:
            results = [r for batch in self.model.iter_scored([e[1] for e in scorable], keep_view=self.output is not None,
                                                               batch_size=self.batch_size) for r in batch]
            score_ms = (time.perf_counter() - start) * 1000 / len(scorable)
            for (path, _, sha, _, read_s), result in zip(scorable, results):
                timings = {"read": round(read_s * 1000, 3), "score": round(score_ms, 3)}
                name = str(path)
                if result.error:
                    self._unreadable(result, path, sha, named_error(result, name), timings)
                    continue
                verdict = verdict_label(result.score, threshold)
                row, overlay = {**result_row(result, name, threshold), **self.run_info.columns()}, None
                if self.output is not None:
                    # named by content too: a camera that reuses a file name must not overwrite the overlay an
                    # earlier inspection's record points at
                    written = write_maps(result, threshold, self.output,
                                         output_name(os.path.relpath(path, self.folder), f".{sha[:12]}.png"))
                    row.update({key: str(self.output / value) for key, value in written.items() if value})
                    overlay = row["overlay"]
                    rows.append(row)
                self.recorder.add(result, name, sha, overlay=overlay, regions=regions_of(result, threshold),
                                  timings_ms=timings)
                self.counts.scored += 1
                self.counts.anomalous += verdict == "anomalous"
                times = f" {result.normalized:.2f}x" if result.normalized is not None else f" {result.score:.4g}"
                self.counts.last = f"{path.name} {verdict}{times}"
        self.recorder.flush()
        if rows:
            self._append_rows(rows)
        self.counts.busy_s += time.perf_counter() - start + sum(entry[4] for entry in read)
        self.on_progress(self.counts)

    def _unreadable(self, result, path: Path, sha: str, error: str, timings: dict) -> None:
        self.recorder.add(result, str(path), sha, error=error, timings_ms=timings)
        self.counts.unreadable += 1
        self.counts.last = f"{path.name} unreadable"
        self.notify(error)

    # ---------------------------------------------------------------------------------------- output
    def _prepare_output(self) -> None:
        """The output folder, and a results.csv that has predict's columns (rows are appended to it)."""
        make_output_folder(self.output)
        csv_path = self.output / "results.csv"
        if csv_path.is_file() and csv_path.stat().st_size:
            with open(csv_path, encoding="utf-8", newline="") as handle:
                header = handle.readline().strip()
            if header != ",".join(csv_columns()):
                raise FastpadimError(f"{csv_path} has other columns than fastpadim's results ({header[:60]}): "
                                     "give another -o")

    def _append_rows(self, rows: list[dict]) -> None:
        csv_path = self.output / "results.csv"
        new = not csv_path.is_file() or not csv_path.stat().st_size
        try:
            with open(csv_path, "a", encoding="utf-8", newline="") as handle:
                handle.write(csv_text(rows, csv_columns(), header=new))
        except OSError as exc:
            raise FastpadimError(f"cannot write {csv_path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Add what is pending to the records (the records themselves stay open: they are the caller's)."""
        self.recorder.flush()
