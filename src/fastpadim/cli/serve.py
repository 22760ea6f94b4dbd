"""``fastpadim serve``: the HTTP inspection service around one model or several (the service itself is
``fastpadim.serve`` and ``fastpadim.http_api``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..images import MAX_IMAGE_PIXELS, megapixels
from ..serve import MAX_DECODING_PIXELS
from .console import say, user_errors
from .options import AllowDownloadOpt, DeviceOpt, EngineOpt, PrecisionOpt, WeightsOpt


def serve(
    model_paths: Annotated[list[Path], typer.Argument(metavar="MODEL...", help="Model files from 'fastpadim fit' (.padim), or their ONNX exports (.onnx); several are served by name (?model=NAME), the name from the file name (bottle for bottle.v2.padim).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens the service to the network (then an API key is required).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    max_batch: Annotated[int, typer.Option(help="Most images in one network batch.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait for more requests to join a batch.")] = 5.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted image upload, in MiB (larger: HTTP 413).")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Most pixels in one image, read from its header before decoding "
                                                 "(larger: HTTP 413).")] = MAX_IMAGE_PIXELS,
    max_decoding_pixels: Annotated[int, typer.Option(help="Most pixels decoded at once by all requests together "
                                                          "(the rest wait their turn).")] = MAX_DECODING_PIXELS,
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
    record: Annotated[Optional[str], typer.Option("--record", metavar="DB", help="Record every verdict: a SQLite file (path or sqlite:///FILE) or postgresql://USER:PASSWORD@HOST/DB.")] = None,
    station: Annotated[Optional[str], typer.Option(help="This line PC's name in the records (default: the host name).")] = None,
    keep: Annotated[Optional[Path], typer.Option("--keep", metavar="DIR", help="Folder for copies of inspected images (flagged ones always, passed ones sampled); default with a SQLite --record: DB.images beside it; required with PostgreSQL.")] = None,
    keep_passed: Annotated[float, typer.Option(help="Share of passed images kept, at random (0 to 1).")] = 0.05,
    keep_max_mb: Annotated[float, typer.Option(help="Most MiB of kept images; the oldest are deleted first.")] = 1024.0,
    keep_days: Annotated[float, typer.Option(help="Kept images older than this many days are deleted.")] = 30.0,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request (uvicorn's access log).")] = True,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File whose first line is the API key clients must send (or set FASTPADIM_API_KEY); required beyond loopback.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", metavar="URL", help="Let browser apps on this origin (scheme://host[:port]) call the API; repeatable. Off by default.")] = None,
) -> None:
    """Serve models over HTTP: POST /v1/score, /v1/score/batch, /v1/model/reload, GET /health, /v1/models,
    /v1/inspections, /v1/drift, /metrics, and a web page at /. SIGHUP reloads every model to its newest version."""
    import functools
    import socket

    import uvicorn

    import fastpadim

    from ..access import check_exposure, check_origins, load_api_key
    from ..http_api import create_app
    from ..model_registry import names_of
    from ..serve import check_options, check_port, warm_up

    with user_errors():
        # Everything that can be wrong with the options is found before the models load (seconds each).
        check_options(max_batch, max_wait_ms, max_upload_mb, max_pixels, max_decoding_pixels)
        check_port(host, port)
        named = names_of(model_paths)
        api_key = load_api_key(api_key_file)
        check_exposure(host, api_key)
        check_origins(cors_origin or [])
        recorder = open_records(record, station or socket.gethostname(), keep, keep_passed, keep_max_mb, keep_days)
        loader = functools.partial(fastpadim.load, device=device, weights=weights, engine=engine, precision=precision,
                                   allow_download=allow_download)
        models = {name: (loader(path), str(path)) for name, path in named.items()}
        api = create_app(models=models, loader=loader, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_upload_mb=max_upload_mb, max_pixels=max_pixels, max_decoding_pixels=max_decoding_pixels,
                         recorder=recorder, api_key=api_key, cors_origins=tuple(cors_origin or ()),
                         reload_on_hangup=True)
        for model, _ in models.values():
            warm_up(model)
    for served in api.state.service.registry.models.values():
        say(f"serving {served.name} version {served.version} from {served.path} ({describe(served.summary)})")
    if recorder is not None:
        kept = f", images kept in {recorder.kept.folder}" if recorder.kept is not None else ""
        say(f"recording verdicts to {recorder.records.url} as station {recorder.station}{kept}")
    say(f"on http://{host}:{port}/  (API docs at /docs; {'API key required' if api_key else 'no API key'}; "
        f"Ctrl+C stops; images up to {megapixels(max_pixels)})")
    log_to_console()
    try:
        uvicorn.run(api, host=host, port=port, log_level="info" if access_log else "warning", access_log=access_log)
    finally:
        if recorder is not None:
            recorder.records.close()


def describe(summary: dict) -> str:
    """The backbone, engine, device and threshold (and where it came from) of a served model."""
    threshold = f"{summary['threshold']:.4g}" if summary["threshold"] is not None else "none"
    calibration = summary["calibration"]
    if calibration and summary["threshold"] is not None:  # where the threshold and the replies' probabilities come from
        threshold += f" set from {calibration['n_good_images']} good images, {calibration['method']}"
    return f"{summary['backbone']}, {summary['engine']} on {summary['device']}, threshold {threshold}"


def open_records(target: str | None, station: str, keep: Path | None, keep_passed: float, keep_max_mb: float,
                 keep_days: float):
    """The service's ``Recorder`` for ``--record`` (None without it), its keep folder ready."""
    if target is None:
        if keep is not None:
            raise FastpadimError("--keep needs --record DB (kept images are found through the records)")
        return None
    from ..kept_images import KeptImages
    from ..records import Records
    from ..records.store import database_url
    from ..serve import Recorder

    url = database_url(target)
    if keep is None:
        if url.get_backend_name() != "sqlite":
            raise FastpadimError("--keep DIR is needed with a PostgreSQL --record: the folder on this machine where "
                                 "copies of inspected images are kept")
        database = Path(url.database)
        keep = database.with_name(database.name + ".images")
    kept = KeptImages(keep, keep_passed=keep_passed, max_mb=keep_max_mb, max_days=keep_days)
    return Recorder(Records(target), station, kept)


def log_to_console() -> None:
    """fastpadim's log lines (reloads, recording failures) beside uvicorn's, in its format."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("fastpadim")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
