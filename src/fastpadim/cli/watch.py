"""``fastpadim watch``: score images as they arrive in a folder, record every verdict, until Ctrl+C."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..results import check_threshold
from .console import console, say, user_errors, warn
from .options import (
    AllowDownloadOpt, BatchSizeOpt, DeviceOpt, EngineOpt, MaxPixelsOpt, PrecisionOpt, WeightsOpt, apply_max_pixels,
)
from .predict import StationOpt

DEFAULT_RECORDS = "inspections.db"
LOG_EVERY_S = 10.0  # the status line, when stderr is no terminal (a log): at most this often


def watch(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim), or its ONNX export (.onnx).")],
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="The folder the images arrive in.")],
    record: Annotated[Optional[str], typer.Option("--record", metavar="DB", help=f"Records database: a SQLite file, or a sqlite:/// or postgresql:// URL (default: {DEFAULT_RECORDS} in the current folder). A file recorded before is not scored again.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write each image's overlay (and mask) here, and append its row to results.csv (predict's columns).")] = None,
    station: StationOpt = None,
    settle: Annotated[float, typer.Option(help="Seconds a file's size and time must stay unchanged before it is read (it is still being written until then).")] = 0.5,
    recursive: Annotated[bool, typer.Option("--recursive", help="Also watch the sub-folders.")] = False,
    stop_after: Annotated[Optional[int], typer.Option(help="Stop once this many images were scored or recorded unreadable.")] = None,
    idle_exit: Annotated[Optional[float], typer.Option(help="Stop once no image arrived for this many seconds.")] = None,
    polling: Annotated[bool, typer.Option("--polling", help="Look for new files by polling (network shares, where file events do not arrive).")] = False,
    threshold: Annotated[Optional[float], typer.Option(help="Override the model's image threshold.")] = None,
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    batch_size: BatchSizeOpt = 8,
    max_pixels: MaxPixelsOpt = None,
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Score the images that arrive in DIR (and those it holds already), each once, once completely written;
    record every verdict; stop with Ctrl+C."""
    from .. import load
    from ..records import Records
    from ..watching import Watcher

    with user_errors():
        threshold = check_threshold(threshold, "--threshold")
        apply_max_pixels(max_pixels)
        if not folder.is_dir():
            raise FastpadimError(f"{folder}: no such folder")
        model = load(model_path, device=device, weights=weights, engine=engine, precision=precision,
                     allow_download=allow_download)
        if threshold is not None:
            model.threshold_ = threshold
        with Records(record or DEFAULT_RECORDS) as records:
            status = LiveStatus()
            watcher = Watcher(model, folder, records, model_path=model_path, station=station, settle=settle,
                              recursive=recursive, output=output, batch_size=batch_size, stop_after=stop_after,
                              idle_exit=idle_exit, force_polling=polling, notify=warn, on_progress=status.update)
            default = " (the default; --record DB for another)" if record is None else ""
            say(f"watching {folder} for images (settle {settle:g} s); recording in {records.url}{default}; "
                "Ctrl+C to stop")
            stop = threading.Event()
            try:
                with stop_on_signals(stop), status.shown():
                    counts = watcher.run(stop)
            finally:
                watcher.close()
            where = f"; wrote {output}/results.csv" if output is not None and counts.scored else ""
            say(f"{counts.summary()}; recorded in {records.url}{where}")


class LiveStatus:
    """The watcher's status line: redrawn in place on a terminal, printed now and then to a log."""

    def __init__(self) -> None:
        self.status = None
        self.printed = time.monotonic()

    @contextmanager
    def shown(self) -> Iterator[None]:
        if not console.is_terminal:
            yield
            return
        with console.status("waiting for images") as self.status:
            yield
        self.status = None

    def update(self, counts) -> None:
        if self.status is not None:
            self.status.update(counts.line())
        elif time.monotonic() - self.printed >= LOG_EVERY_S:
            self.printed = time.monotonic()
            say(counts.line())


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl+C and SIGTERM end the watch cleanly (the batch being scored is finished and recorded); a second
    Ctrl+C interrupts at once. Handlers can only be set in the main thread (elsewhere the caller stops it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

