"""Writing files safely: atomic writes, output folders, writable targets. Standard library only.

Every file fastpadim writes goes through ``atomic_write``: one private temporary folder beside the target that
fastpadim owns, whose file is renamed over the target when complete. SIGTERM (and Ctrl+C) during the write remove the temporary; a
disk-full or permission failure is one line naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import FastpadimError

TEMP_SUFFIX = ".tmp"


def os_reason(exc: OSError) -> str:
    """A short reason for an OSError: 'no space left' for a full disk, else its strerror."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)


def folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_writable_file(path: str | os.PathLike) -> None:
    """One line, before any work, when ``path`` cannot be written."""
    path = Path(path)
    folder = folder_of(path)
    if path.is_dir():
        raise FastpadimError(f"cannot write {path}: it is a folder")
    if not folder.is_dir():
        raise FastpadimError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise FastpadimError(f"cannot write {path}: permission denied")


def make_output_folder(folder: str | os.PathLike) -> bool:
    """Create ``folder`` (and parents) if needed and check it is writable; True if it was created now."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FastpadimError(f"cannot create output folder {folder}: {os_reason(exc)}") from None
    if not os.access(folder, os.W_OK):
        raise FastpadimError(f"cannot write to {folder}: permission denied")
    return created


@contextmanager
def terminate_unwinds():
    """While active, SIGTERM raises SystemExit in the main thread, so ``finally`` blocks (which remove
    temporaries) run; a handler someone else installed (uvicorn, Ray) is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename: never a partial file.

    The temporary lives in a private folder ``.<name>.<random>.tmp/`` beside the target, so whatever the
    writer makes there (safetensors writes a temporary of its own and renames it) goes with it: the folder
    is removed on any failure, on Ctrl+C and on SIGTERM (only SIGKILL can leave it behind).
    """
    path = Path(path)
    folder = folder_of(path)
    if not folder.is_dir():
        raise FastpadimError(f"cannot write {path}: folder {folder} does not exist")
    umask = os.umask(0)
    os.umask(umask)
    with terminate_unwinds():
        try:
            work = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=folder)
        except OSError as exc:
            raise FastpadimError(f"cannot write {path}: {os_reason(exc)}") from None
        try:
            tmp = os.path.join(work, path.name)
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # a model or report is an ordinary file
            os.replace(tmp, path)
        except OSError as exc:
            raise FastpadimError(f"cannot write {path}: {os_reason(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - writers (safetensors, PIL, onnx) wrap OS errors in their own types
            if "No space left" in str(exc) or "os error 28" in str(exc):
                raise FastpadimError(f"cannot write {path}: no space left on the device") from None
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """A UTF-8 text file, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)


# ------------------------------------------------------------------------------ a run's output folder
# What a predict run writes into OUTPUT, in the order it is moved into place (results.csv last: once it is
# there, everything it points at is too).
RESULT_ENTRIES = ("overlays", "masks", "results.json", "results.csv")
STAGING_PREFIX = ".fastpadim-partial-"


def common_root(source: Path, items) -> Path:
    """The folder output names are relative to: SOURCE when it is a folder, else the deepest folder holding every
    input. Absolute paths, symlinks not resolved: a linked image keeps the place it was given, so good/000.png
    and broken/000.png (or the same name in two folders of a glob or list) never share an output."""
    if source.is_dir():
        return Path(os.path.abspath(source))
    return Path(os.path.commonpath(sorted({os.path.dirname(os.path.abspath(item.path)) for item in items})))


class OutputNames:
    """One output name per input, unique within the run and stable across runs: the input's path relative to the
    common root, with its full file name kept (``good/a.jpg`` → ``good/a.jpg.png``, so a.png and a.jpg differ;
    a frame: ``cam.mkv#frame=3.png``). Should two inputs still meet (the same file listed twice, or names that
    differ only in case), the later one gets ``~2``, ``~3``, … before the suffix."""

    def __init__(self, root: Path, items) -> None:
        # a frame's name is its video's path plus a mark (``#frame=3``), kept after the relative path
        self.relative = {item.name: os.path.relpath(os.path.abspath(item.path), root) + item.name[len(item.path):]
                         for item in items}
        self.used: set[str] = set()

    def __call__(self, name: str, suffix: str = ".png") -> Path:
        first = output_name(self.relative.get(name, os.path.basename(name)), suffix)
        candidate, n = first, 2
        while candidate.as_posix().casefold() in self.used:  # casefold: a case-insensitive disk would merge them
            candidate, n = first.with_name(f"{first.name.removesuffix(suffix)}~{n}{suffix}"), n + 1
        self.used.add(candidate.as_posix().casefold())
        return candidate


def previous_results(output: Path) -> list[str]:
    return [name for name in RESULT_ENTRIES if os.path.lexists(output / name)] if output.is_dir() else []


def move_into_place(staging: Path, output: Path) -> None:
    """Replace a previous run's results in OUTPUT with the staged ones. The previous ones are moved aside into the
    staging folder (removed with it), so no old overlay or mask stays mixed with the new results; if a move fails,
    what was moved is moved back."""
    aside = staging / "previous"
    aside.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in RESULT_ENTRIES:
            if os.path.lexists(output / name):
                os.replace(output / name, aside / name)
                moved_out.append(name)
        for name in RESULT_ENTRIES:
            if os.path.lexists(staging / name):
                os.replace(staging / name, output / name)
                moved_in.append(name)
    except OSError as exc:
        for name in reversed(moved_in):
            with suppress(OSError):
                os.replace(output / name, staging / name)
        for name in moved_out:
            with suppress(OSError):
                os.replace(aside / name, output / name)
        raise FastpadimError(f"cannot move the results into {output}: {os_reason(exc)}") from None


def output_name(relative: str | os.PathLike, suffix: str) -> Path:
    """File name for an output about one input: the input's full name plus ``suffix`` (``a/b.jpg`` →
    ``a/b.jpg{suffix}``), so ``b.png`` and ``b.jpg`` never share an output; a video frame keeps its video's name
    and number the same way (``v.mp4#frame=3`` → ``v.mp4#frame=3{suffix}``)."""
    path = Path(relative)
    return path.with_name(path.name + suffix)


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
