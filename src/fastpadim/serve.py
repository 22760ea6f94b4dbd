"""``fastpadim serve``: an HTTP inspection service (FastAPI) around one loaded model, plus a web page at ``/``.

Requests are decoded in threads, then grouped into network batches by ``MicroBatcher`` (one thread owns the
model), so the event loop keeps answering (``/health`` included) while images are scored. Memory is bounded per
image (the pixel limit, checked from the header), across requests (``PixelBudget``: pixels decoded at once), and
is given back to the OS after large decodes (glibc's ``malloc_trim``).
"""

# No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' types at run time.
import base64
import ctypes
import errno
import functools
import io
import socket
import time
from typing import TYPE_CHECKING, Annotated, Optional

from .errors import FastpadimError, ImageError
from .images import MAX_IMAGE_PIXELS, ImageTooLarge, check_max_pixels, read_size

if TYPE_CHECKING:
    from fastapi import FastAPI
    from PIL import Image

    from .images import Preprocessing
    from .model import Padim
    from .onnx_runtime import OnnxPadim
    from .results import ScoredImage

MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and headers around the image bytes
MAX_BATCH_FILES = 64  # images in one /v1/score/batch request
RAW_TYPES = ("application/octet-stream",)  # besides image/*
UPLOAD_HINT = "send an image as the multipart field 'file' (curl -F file=@image.png) or as the raw request body"
MAX_DECODING_PIXELS = 2 * MAX_IMAGE_PIXELS  # pixels being decoded at once, all requests together
TRIM_AFTER_PIXELS = 4_000_000  # decodes this large leave freed heap that glibc keeps: give it back once idle


def decode_upload(data: bytes, name: str, preprocessing: "Preprocessing | None" = None,
                  max_pixels: int | None = None) -> "Image.Image":
    """Uploaded bytes → RGB PIL image, or ImageError with a one-line reason (same checks as files on disk; above
    ``max_pixels``, default ``images.MAX_IMAGE_PIXELS``: ImageTooLarge, from the header). With ``preprocessing``
    the image comes back resized to the network's input side (a large JPEG decoded at reduced scale), so a request
    waiting for its batch holds a small image, not the full-resolution one; the scores are the same (the model's
    own resize of it is then a copy)."""
    from .images import open_image

    reduce_to = preprocessing.image_size if preprocessing is not None else None
    image = open_image(data, name=name, max_pixels=max_pixels, reduce_to=reduce_to)
    return preprocessing.resize(image) if preprocessing is not None else image


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim, freed memory is handled there
        return None


def release_memory() -> bool:
    """Hand freed heap memory back to the OS. glibc keeps what a large decode freed (Pillow's 16 MB blocks fall
    under its raised mmap threshold), so without this the service stays at its peak after a burst of large
    images. False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def check_options(max_batch: int, max_wait_ms: float, max_upload_mb: float, max_pixels: int,
                  max_decoding_pixels: int) -> None:
    """The service's limits, checked before anything slow (loading the model) happens."""
    if max_batch < 1:
        raise FastpadimError(f"--max-batch must be at least 1, got {max_batch}")
    if not max_wait_ms >= 0:  # NaN too
        raise FastpadimError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if not 0 < max_upload_mb < float("inf"):
        raise FastpadimError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    check_max_pixels(max_pixels, "--max-pixels")
    if isinstance(max_decoding_pixels, bool) or not isinstance(max_decoding_pixels, int) or max_decoding_pixels < 1:
        raise FastpadimError(f"--max-decoding-pixels must be a whole number of pixels >= 1, "
                             f"got {max_decoding_pixels!r}")


def check_port(host: str, port: int) -> None:
    """Fail in one line, before the model is loaded, when ``host:port`` cannot be listened on (in use, not an
    address of this machine, a privileged port). Binds the way uvicorn does (SO_REUSEADDR), then lets go."""
    if not 0 < port < 65536:
        raise FastpadimError(f"--port must be between 1 and 65535, got {port}")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise FastpadimError(f"cannot listen on {where}: unknown host ({exc.strerror}); use an address of this "
                             "machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's create_server
                sock.bind(address)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            hint = {errno.EADDRINUSE: "stop the other server or choose another --port",
                    errno.EACCES: "ports below 1024 need privileges; choose a --port above 1023",
                    errno.EADDRNOTAVAIL: "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"}.get(exc.errno)
            raise FastpadimError(f"cannot listen on {where}: {reason}" + (f"; {hint}" if hint else "")) from None


def score_batch(model: "Padim", images: list) -> "list[ScoredImage]":
    """The batcher's work, always on the model thread: one network batch for all ``images``."""
    return [result for batch in model.iter_scored(images, keep_view=True, batch_size=max(1, len(images)))
            for result in batch]


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
               max_upload_mb: float = 20.0, max_queue: int = 256, max_pixels: int = MAX_IMAGE_PIXELS,
               max_decoding_pixels: int = MAX_DECODING_PIXELS) -> "FastAPI":
    """The FastAPI application serving ``model``; the batcher starts and stops with the app's lifespan.

    ``max_pixels``: the most pixels in one image (checked from its header, before decoding; above: HTTP 413);
    ``max_decoding_pixels``: the most pixels decoded at once by all requests together (others wait their turn)."""
    import asyncio
    from contextlib import asynccontextmanager
    from importlib.resources import files

    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .batcher import MicroBatcher, PixelBudget, QueueFull
    from .results import VERDICT_LABELS, verdict

    check_options(max_batch, max_wait_ms, max_upload_mb, max_pixels, max_decoding_pixels)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    batcher = MicroBatcher(lambda images: score_batch(model, images), max_batch, max_wait_ms / 1000.0, max_queue,
                           on_idle=release_memory)  # after a burst, the network's freed memory goes back to the OS
    budget = PixelBudget(max_decoding_pixels)
    preprocessing = model.preprocessing_
    large_decodes = {"pixels": 0}  # pixels of large images decoded since memory was last handed back
    page = (files("fastpadim") / "static" / "index.html").read_text(encoding="utf-8")
    summary = model_summary(model, model_path)

    @asynccontextmanager
    async def lifespan(_app):
        budget.open()
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    api = FastAPI(title="fastpadim inspection service", version=summary["fastpadim_version"], lifespan=lifespan,
                  description="PaDiM anomaly scores, verdicts and heatmaps for images posted by a line PC.")
    api.state.batcher = batcher
    api.state.budget = budget

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
    def judge(score: float) -> tuple[str, bool | None]:
        """results.verdict, the one place a verdict is made: a non-finite score raises FastpadimError (no verdict)."""
        flagged = verdict(score, model.threshold_)
        return VERDICT_LABELS[flagged], flagged

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

            too_many = ("more than one file sent to /v1/score; use /v1/score/batch for several" if max_files == 1
                        else f"more than {max_files} files in one request; send at most {max_files}")
            try:
                form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files + 16)
            except StarletteHTTPException as exc:  # Starlette's parser stops at max_files with its own wording (400)
                if "too many files" in str(exc.detail).lower():
                    raise HTTPException(413, too_many) from None
                raise
            parts = form.getlist("file")
            if not parts:
                raise HTTPException(400, f"no 'file' field in the form; {UPLOAD_HINT}")
            if len(parts) > max_files:
                raise HTTPException(413, too_many)
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
                uploads.append((name, data))  # an empty file fails on its own when decoded (one entry of a batch)
            return uploads
        if content_type and not (content_type.startswith("image/") or content_type in RAW_TYPES):
            raise HTTPException(415, f"content type {content_type} is not accepted; {UPLOAD_HINT}")
        data = await read_body(request, max_bytes)
        if not data:
            raise HTTPException(400, f"empty body; {UPLOAD_HINT}")
        return [("<body>", data)]

    async def decode_one(name: str, data: bytes) -> tuple[str, object, float]:
        """Header first (refused above the pixel limit before anything is decoded), then a turn in the pixel budget,
        then the decode in a worker thread, to an image already resized to the network's input."""
        start = time.perf_counter()
        try:
            width, height = await run_in_threadpool(read_size, data, name, max_pixels)
            async with budget.reserve(width * height):
                image = await run_in_threadpool(decode_upload, data, name, preprocessing, max_pixels)
            if width * height >= TRIM_AFTER_PIXELS:
                large_decodes["pixels"] += width * height
        except ImageError as exc:
            image = exc
        return name, image, time.perf_counter() - start

    async def decode_all(uploads: list[tuple[str, bytes]]) -> list[tuple[str, object, float]]:
        """(name, PIL image or ImageError, seconds) for each upload, decoded in worker threads off the event loop;
        once no decode is left in flight after large ones, the freed memory goes back to the OS."""
        decoded = list(await asyncio.gather(*(decode_one(n, d) for n, d in uploads)))
        if large_decodes["pixels"] and budget.in_use == 0:
            large_decodes["pixels"] = 0
            await run_in_threadpool(release_memory)
        return decoded

    async def score(images: list) -> tuple[list, object]:
        try:
            return await batcher.submit(images)
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None

    def named(result, name: str) -> str:
        """The model's error for an image, under the upload's name (the model only knows "<image 0>")."""
        prefix = f"{result.name}: "
        return f"{name}: {result.error[len(prefix):]}" if result.error.startswith(prefix) else result.error

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
            raise HTTPException(413 if isinstance(image, ImageTooLarge) else 422, str(image))
        (result,), timing = await score([image])
        if result.error:  # unreadable, or a non-finite score (results.ScoredImage turns it into an error)
            raise HTTPException(422, named(result, name))
        label, flagged = judge(result.score)
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
                items[i]["error"] = named(result, items[i]["name"])
                continue
            try:
                label, flagged = judge(result.score)
            except FastpadimError as exc:  # no verdict for this image; the others keep theirs
                items[i]["error"] = f"{items[i]['name']}: {exc}"
                continue
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

    api.add_middleware(UnexpectedErrors)
    return api


class UnexpectedErrors:
    """Any other exception in a request becomes a JSON 500 with one line, logged with its traceback. Unlike an
    exception handler for ``Exception`` (Starlette re-raises after answering, and uvicorn then closes the
    connection, so a keep-alive client's next request is reset), the connection stays usable."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:  # noqa: BLE001 - one failed request must not cost the connection
            if started:
                raise  # half a response is out: nothing better than closing the connection
            import logging

            from fastapi.responses import JSONResponse

            logging.getLogger("fastpadim.serve").error("internal error in %s %s", scope.get("method"),
                                                       scope.get("path"), exc_info=exc)
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            response = JSONResponse({"detail": f"internal error: {type(exc).__name__}: {first_line}"}, status_code=500)
            await response(scope, receive, send)
