"""``fastpadim serve``: an HTTP inspection service (FastAPI) around one loaded model, plus a web page at ``/``.

Requests are decoded in threads, then grouped into network batches by ``MicroBatcher`` (one thread owns the
model), so the event loop keeps answering (``/health`` included) while images are scored.
"""

# No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' types at run time.
import base64
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .cli import app, console, user_errors
from .errors import FastpadimError, ImageError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from PIL import Image

    from .model import Padim
    from .onnx_runtime import OnnxPadim
    from .results import ScoredImage

MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and headers around the image bytes
MAX_BATCH_FILES = 64  # images in one /v1/score/batch request
RAW_TYPES = ("application/octet-stream",)  # besides image/*
UPLOAD_HINT = "send an image as the multipart field 'file' (curl -F file=@image.png) or as the raw request body"


def decode_upload(data: bytes, name: str) -> "Image.Image":
    """Uploaded bytes → RGB PIL image, or ImageError with a one-line reason (same checks as files on disk)."""
    from .images import open_image

    return open_image(data, name=name)


def score_batch(model: "Padim", images: list) -> "list[ScoredImage]":
    """The batcher's work, always on the model thread: one network batch for all ``images``."""
    model.batch_size = max(1, len(images))
    return [result for batch in model.iter_scored(images, keep_view=True) for result in batch]


def warm_up(model: "Padim") -> None:
    """One throw-away run so the first real request does not pay for lazy initialisation."""
    from PIL import Image

    size = model.preprocessing_.image_size
    (result,) = score_batch(model, [Image.new("RGB", (size, size), (128, 128, 128))])
    overlay_png_base64(result, model.threshold_)  # loads the colour map (matplotlib) before the first heatmap


def overlay_png_base64(result: "ScoredImage", threshold: float | None) -> str:
    from .visualize import overlay

    buffer = io.BytesIO()
    overlay(result.view, result.anomaly_map, threshold).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def model_summary(model: "Padim | OnnxPadim", model_path: str | None) -> dict:
    if hasattr(model, "engine"):  # an ONNX export: the metadata stored in it (no torch needed)
        meta, engine, device = model.metadata_, model.engine, model.device
    else:
        from .modelfile import model_metadata

        meta, engine, device = model_metadata(model), "torch", model.device_.type
    bb, pre, th = meta["backbone"], meta["preprocessing"], meta["threshold"]
    return {
        "model_file": model_path,
        "format_version": meta["format_version"],
        "fastpadim_version": meta["fastpadim_version"],
        "backbone": bb["name"],
        "timm_name": bb["timm_name"],
        "layers": bb["layers"],
        "n_features": bb["n_features"],
        "weights_id": bb["weights_id"],
        "input": {"image_size": pre["image_size"], "crop_size": pre["crop_size"],
                  "map_size": model.preprocessing_.output_size},
        "n_train_images": meta["n_train_images"],
        "threshold": model.threshold_,
        "false_alarm_rate": th["false_alarm_rate"],
        "device": device,
        "engine": engine,
    }


def create_app(model: "Padim | OnnxPadim", model_path: str | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
               max_upload_mb: float = 20.0, max_queue: int = 256) -> "FastAPI":
    """The FastAPI application serving ``model``; the batcher starts and stops with the app's lifespan."""
    import asyncio
    from contextlib import asynccontextmanager
    from importlib.resources import files

    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    from .batcher import MicroBatcher, QueueFull

    if max_batch < 1:
        raise FastpadimError(f"--max-batch must be at least 1, got {max_batch}")
    if max_wait_ms < 0:
        raise FastpadimError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if max_upload_mb <= 0:
        raise FastpadimError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    max_bytes = int(max_upload_mb * 1024 * 1024)
    batcher = MicroBatcher(lambda images: score_batch(model, images), max_batch, max_wait_ms / 1000.0, max_queue)
    page = (files("fastpadim") / "static" / "index.html").read_text(encoding="utf-8")
    summary = model_summary(model, model_path)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    api = FastAPI(title="fastpadim inspection service", version=summary["fastpadim_version"], lifespan=lifespan,
                  description="PaDiM anomaly scores, verdicts and heatmaps for images posted by a line PC.")
    api.state.batcher = batcher

    # ------------------------------------------------------------------------------ response models
    class Timings(BaseModel):
        decode: float
        queue: float
        model: float
        total: float
        heatmap: Optional[float] = None

    class Score(BaseModel):
        name: str
        score: float
        verdict: str  # anomalous, good, or unknown when the model has no threshold
        is_anomalous: Optional[bool]
        threshold: Optional[float]
        batch_size: int  # images in the network batch this one ran in (other requests' included)
        timings_ms: Timings
        heatmap_png_base64: Optional[str] = None

    class BatchItem(BaseModel):
        name: str
        score: Optional[float] = None
        verdict: Optional[str] = None
        is_anomalous: Optional[bool] = None
        heatmap_png_base64: Optional[str] = None
        error: Optional[str] = None

    class BatchScore(BaseModel):
        threshold: Optional[float]
        batch_size: int
        scored: int
        failed: int
        results: list[BatchItem]
        timings_ms: Timings

    # ----------------------------------------------------------------------------------- helpers
    def verdict(score: float) -> tuple[str, bool | None]:
        if model.threshold_ is None:
            return "unknown", None
        flagged = bool(score > model.threshold_)
        return ("anomalous" if flagged else "good"), flagged

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"upload of {int(declared)} bytes is above the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"upload is above the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_uploads(request: Request, max_files: int) -> list[tuple[str, bytes]]:
        """The uploaded images as (name, bytes): multipart field ``file`` (repeated for batches) or the raw body."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            body = await read_body(request, max_bytes * max_files + MULTIPART_SLACK)

            async def replay():  # the form parser reads the body we already hold
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files + 16)
            parts = form.getlist("file")
            if not parts:
                raise HTTPException(400, f"no 'file' field in the form; {UPLOAD_HINT}")
            if len(parts) > max_files:
                raise HTTPException(413, f"{len(parts)} files in one request; at most {max_files}")
            uploads = []
            for i, part in enumerate(parts):
                if not isinstance(part, UploadFile):
                    raise HTTPException(400, f"form field 'file' must be a file upload, not text; {UPLOAD_HINT}")
                name = part.filename or f"<image {i}>"
                part_type = (part.content_type or "").split(";")[0].strip().lower()
                if part_type and not (part_type.startswith("image/") or part_type in RAW_TYPES):
                    raise HTTPException(415, f"{name}: content type {part_type} is not an image")
                data = await part.read()
                if len(data) > max_bytes:
                    raise HTTPException(413, f"{name}: {len(data)} bytes is above the limit of {max_bytes} bytes")
                if not data:
                    raise HTTPException(400, f"{name}: empty file")
                uploads.append((name, data))
            return uploads
        if content_type and not (content_type.startswith("image/") or content_type in RAW_TYPES):
            raise HTTPException(415, f"content type {content_type} is not accepted; {UPLOAD_HINT}")
        data = await read_body(request, max_bytes)
        if not data:
            raise HTTPException(400, f"empty body; {UPLOAD_HINT}")
        return [("<body>", data)]

    async def decode_all(uploads: list[tuple[str, bytes]]) -> list[tuple[str, object, float]]:
        """(name, PIL image or ImageError, seconds), decoded in worker threads off the event loop."""

        def decode(name: str, data: bytes):
            start = time.perf_counter()
            try:
                image = decode_upload(data, name)
            except ImageError as exc:
                image = exc
            return name, image, time.perf_counter() - start

        return list(await asyncio.gather(*(run_in_threadpool(decode, n, d) for n, d in uploads)))

    async def score(images: list) -> tuple[list, object]:
        try:
            return await batcher.submit(images)
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None

    def ms(seconds: float) -> float:
        return round(seconds * 1000.0, 2)

    # ------------------------------------------------------------------------------------ routes
    body_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}}
    batch_doc = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}
    errors_doc = {400: {"description": "empty or malformed upload"}, 413: {"description": "upload above the size limit"},
                  415: {"description": "not an image content type"}, 422: {"description": "not a readable image"},
                  503: {"description": "too many requests waiting"}}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @api.get("/health", summary="Liveness: answers while images are being scored")
    async def health() -> dict:
        return {"status": "ok", "waiting": batcher.waiting, "batches_run": batcher.batches_run,
                "largest_batch": batcher.largest_batch}

    @api.get("/v1/model", summary="What the loaded model is: backbone, input size, training count, threshold")
    async def model_info() -> dict:
        return summary

    @api.post("/v1/score", response_model=Score, response_model_exclude_unset=True, responses=errors_doc, openapi_extra=body_doc,
              summary="Score one image (multipart field 'file' or the raw body)")
    async def score_one(request: Request,
                        heatmap: Annotated[bool, Query(description="Add the heatmap overlay as base64 PNG.")] = False):
        start = time.perf_counter()
        uploads = await read_uploads(request, max_files=1)
        if len(uploads) != 1:
            raise HTTPException(400, f"{len(uploads)} files sent to /v1/score; use /v1/score/batch for several")
        name, image, decode_s = (await decode_all(uploads))[0]
        if isinstance(image, ImageError):
            raise HTTPException(422, str(image))
        (result,), timing = await score([image])
        if result.error:
            raise HTTPException(422, result.error)
        label, flagged = verdict(result.score)
        timings = {"decode": ms(decode_s), "queue": ms(timing.queue_s), "model": ms(timing.model_s)}
        response = {"name": name, "score": result.score, "verdict": label, "is_anomalous": flagged,
                    "threshold": model.threshold_, "batch_size": timing.batch_size}
        if heatmap:
            drawn = time.perf_counter()
            response["heatmap_png_base64"] = await run_in_threadpool(overlay_png_base64, result, model.threshold_)
            timings["heatmap"] = ms(time.perf_counter() - drawn)
        timings["total"] = ms(time.perf_counter() - start)
        return {**response, "timings_ms": timings}

    @api.post("/v1/score/batch", response_model=BatchScore, response_model_exclude_unset=True, responses=errors_doc, openapi_extra=batch_doc,
              summary="Score several images (repeated multipart field 'file') in one network batch")
    async def score_many(request: Request,
                         heatmap: Annotated[bool, Query(description="Add heatmap overlays as base64 PNG.")] = False):
        start = time.perf_counter()
        uploads = await read_uploads(request, max_files=MAX_BATCH_FILES)
        decoded = await decode_all(uploads)
        readable = [(i, image) for i, (_, image, _) in enumerate(decoded) if not isinstance(image, ImageError)]
        items = [{"name": name, "error": str(image) if isinstance(image, ImageError) else None}
                 for name, image, _ in decoded]
        if not readable:
            raise HTTPException(422, "no image could be read: " + "; ".join(item["error"] for item in items))
        results, timing = await score([image for _, image in readable])
        drawn = time.perf_counter()
        for (i, _), result in zip(readable, results):
            if result.error:
                items[i]["error"] = result.error
                continue
            label, flagged = verdict(result.score)
            items[i].update(score=result.score, verdict=label, is_anomalous=flagged)
            if heatmap:
                items[i]["heatmap_png_base64"] = await run_in_threadpool(overlay_png_base64, result, model.threshold_)
        timings = {"decode": ms(sum(d for _, _, d in decoded)), "queue": ms(timing.queue_s),
                   "model": ms(timing.model_s)}
        if heatmap:
            timings["heatmap"] = ms(time.perf_counter() - drawn)
        timings["total"] = ms(time.perf_counter() - start)
        failed = sum(item["error"] is not None for item in items)
        return {"threshold": model.threshold_, "batch_size": timing.batch_size, "scored": len(items) - failed,
                "failed": failed, "results": items, "timings_ms": timings}

    @api.exception_handler(FastpadimError)
    async def fastpadim_error(_request: Request, exc: FastpadimError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @api.exception_handler(Exception)
    async def unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {first_line}"}, status_code=500)

    return api


# ------------------------------------------------------------------------------------------ command
@app.command()
def serve(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim), or its ONNX export (.onnx).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens the service to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    weights: Annotated[Optional[str], typer.Option("--weights", help="Backbone weights file, if not where the model was fitted.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most images in one network batch.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait for more requests to join a batch.")] = 5.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted image upload, in MiB (larger: HTTP 413).")] = 20.0,
    engine: Annotated[Optional[str], typer.Option(help="For .onnx models: onnxruntime (default) or openvino.")] = None,
) -> None:
    """Serve a model over HTTP: POST /v1/score, /v1/score/batch, GET /health, /v1/model, and a web page at /."""
    import uvicorn

    from . import load

    with user_errors():
        if not 0 < port < 65536:
            raise FastpadimError(f"--port must be between 1 and 65535, got {port}")
        model = load(model_path, device=device, weights=weights, engine=engine)
        api = create_app(model, str(model_path), max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_upload_mb=max_upload_mb)
        warm_up(model)
        summary = model_summary(model, str(model_path))
    threshold = f"{model.threshold_:.4g}" if model.threshold_ is not None else "none"
    console.print(f"serving {model_path} ({summary['backbone']}, {summary['engine']} on {summary['device']}, threshold {threshold}) "
                  f"on http://{host}:{port}/  (API docs at /docs; Ctrl+C stops)", highlight=False, soft_wrap=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/yellow] listening on {host}: anyone who can reach it can use the service "
                      "(there is no authentication)", highlight=False)
    uvicorn.run(api, host=host, port=port, log_level="warning", access_log=False)
