"""Writing files safely: atomic writes, output folders, writable targets. Standard library only.

Every file fastpadim writes goes through ``atomic_write``: one temporary beside the target that fastpadim owns,
renamed over the target when complete. SIGTERM (and Ctrl+C) during the write remove the temporary; a
disk-full or permission failure is one line naming the file.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
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
def _terminate_unwinds():
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
    with _terminate_unwinds():
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
