"""``fastpadim serve``: the HTTP inspection service around one model (the service itself is ``fastpadim.serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..serve import MAX_DECODING_PIXELS
from ..images import MAX_IMAGE_PIXELS, megapixels
from .console import say, user_errors, warn
from .options import AllowDownloadOpt, DeviceOpt, EngineOpt, PrecisionOpt, WeightsOpt


def serve(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim), or its ONNX export (.onnx).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens the service to the network.")] = "127.0.0.1",
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
) -> None:
    """Serve a model over HTTP: POST /v1/score, /v1/score/batch, GET /health, /v1/model, and a web page at /."""
    import uvicorn

    from .. import load
    from ..http_api import create_app
    from ..serve import check_options, check_port, model_summary, warm_up

    with user_errors():
        # Everything that can be wrong with the options is found before the model load (seconds).
        check_options(max_batch, max_wait_ms, max_upload_mb, max_pixels, max_decoding_pixels)
        check_port(host, port)
        model = load(model_path, device=device, weights=weights, engine=engine, precision=precision,
                     allow_download=allow_download)
        api = create_app(model, str(model_path), max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_upload_mb=max_upload_mb, max_pixels=max_pixels, max_decoding_pixels=max_decoding_pixels)
        warm_up(model)
        summary = model_summary(model, str(model_path))
    threshold = f"{model.threshold_:.4g}" if model.threshold_ is not None else "none"
    calibration = summary["calibration"]
    if calibration and model.threshold_ is not None:  # where the threshold and the replies' probabilities come from
        threshold += f" set from {calibration['n_good_images']} good images, {calibration['method']}"
    say(f"serving {model_path} ({summary['backbone']}, {summary['engine']} on {summary['device']}, threshold {threshold}) "
        f"on http://{host}:{port}/  (API docs at /docs; Ctrl+C stops; images up to {megapixels(max_pixels)})")
    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"listening on {host}: anyone who can reach it can use the service (there is no authentication)")
    uvicorn.run(api, host=host, port=port, log_level="warning", access_log=False)
