"""The HTTP API of ``fastpadim serve`` (FastAPI): response models, the request pipeline and the routes.

One ``InspectionService`` per app holds the model and the limits; a request goes read (size limits) → header
(pixel limit) → a turn in the ``PixelBudget`` → decode in a worker thread → ``MicroBatcher`` (one thread owns the
model) → verdict (``results.verdict``). Routes are module-level and find the service on ``request.app.state``.
Imported only when an app is built, so the command line loads no FastAPI.
"""

# No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' types at run time.
import asyncio
import time
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Optional

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import MicroBatcher, PixelBudget, QueueFull
from .errors import FastpadimError, ImageError
from .images import ImageTooLarge, read_size
from .results import VERDICT_LABELS, verdict
from .images import MAX_IMAGE_PIXELS
from .serve import (
    MAX_BATCH_FILES, MAX_DECODING_PIXELS, MULTIPART_SLACK, RAW_TYPES, TRIM_AFTER_PIXELS, UPLOAD_HINT, check_options,
    decode_upload, in_frame, model_summary, readable_score, release_memory, score_batch,
)


# ------------------------------------------------------------------------------------ response models
class Timings(BaseModel):
    decode: float
    queue: float
    model: float
    total: float
    heatmap: Optional[float] = None
    regions: Optional[float] = None

class Region(BaseModel):
    """A defect: bounding box in the uploaded image's pixels (x right, y down, from its top-left corner)."""
    x: int
    y: int
    width: int
    height: int
    area: int  # pixels above the threshold
    peak: float  # the highest anomaly score inside

class Score(BaseModel):
    name: str
    score: float
    normalized: Optional[float]  # score / threshold: 1.0 is the threshold (null without one)
    false_alarm_probability: Optional[float]  # estimated chance a good part scores this high (null: no calibration)
    verdict: str  # anomalous, good, or unknown when the model has no threshold
    is_anomalous: Optional[bool]
    threshold: Optional[float]
    batch_size: int  # images in the network batch this one ran in (other requests' included)
    timings_ms: Timings
    heatmap_png_base64: Optional[str] = None  # the overlay at the uploaded image's size
    regions: Optional[list[Region]] = None  # highest peak first, at most regions.MAX_REGIONS
    regions_left_out: Optional[int] = None  # weaker regions beyond that

class BatchItem(BaseModel):
    name: str
    score: Optional[float] = None
    normalized: Optional[float] = None
    false_alarm_probability: Optional[float] = None
    verdict: Optional[str] = None
    is_anomalous: Optional[bool] = None
    heatmap_png_base64: Optional[str] = None
    regions: Optional[list[Region]] = None
    regions_left_out: Optional[int] = None
    error: Optional[str] = None

class BatchScore(BaseModel):
    threshold: Optional[float]
    batch_size: int
    scored: int
    failed: int
    results: list[BatchItem]
    timings_ms: Timings


# --------------------------------------------------------------------------------------------- service
class InspectionService:
    """One model behind the API, with the limits that bound what a request may cost."""

    def __init__(self, model, model_path, max_batch: int, max_wait_ms: float, max_upload_mb: float, max_queue: int,
                 max_pixels: int, max_decoding_pixels: int):
        self.model = model
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_pixels = max_pixels
        # after a burst, the network's freed memory goes back to the OS
        self.batcher = MicroBatcher(lambda images: score_batch(model, images), max_batch, max_wait_ms / 1000.0,
                                    max_queue, on_idle=release_memory)
        self.budget = PixelBudget(max_decoding_pixels)
        self.large_decodes = 0  # pixels of large images decoded since memory was last handed back
        self.page = (files("fastpadim") / "static" / "index.html").read_text(encoding="utf-8")
        self.summary = model_summary(model, model_path)

    def judge(self, score: float) -> tuple[str, bool | None]:
        """results.verdict, the one place a verdict is made: a non-finite score raises FastpadimError (no verdict)."""
        flagged = verdict(score, self.model.threshold_)
        return VERDICT_LABELS[flagged], flagged

    async def read_body(self, request: Request, limit: int) -> bytes:
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

    async def read_uploads(self, request: Request, max_files: int) -> list[tuple[str, bytes]]:
        """The uploaded images as (name, bytes): multipart field ``file`` (repeated for batches) or the raw body."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            body = await self.read_body(request, self.max_bytes * max_files + MULTIPART_SLACK)

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
                if len(data) > self.max_bytes:
                    raise HTTPException(413, f"{name}: {len(data)} bytes is above the limit of {self.max_bytes} bytes")
                uploads.append((name, data))  # an empty file fails on its own when decoded (one entry of a batch)
            return uploads
        if content_type and not (content_type.startswith("image/") or content_type in RAW_TYPES):
            raise HTTPException(415, f"content type {content_type} is not accepted; {UPLOAD_HINT}")
        data = await self.read_body(request, self.max_bytes)
        if not data:
            raise HTTPException(400, f"empty body; {UPLOAD_HINT}")
        return [("<body>", data)]

    async def decode_one(self, name: str, data: bytes, wants: "Wants") -> tuple[str, object, float]:
        """Header first (refused above the pixel limit before anything is decoded), then a turn in the pixel budget,
        then the decode in a worker thread, to an image already resized to the network's input (and the frame's
        size, or its pixels, where the reply speaks in them)."""
        start = time.perf_counter()
        try:
            width, height = await run_in_threadpool(read_size, data, name, self.max_pixels)
            async with self.budget.reserve(width * height):
                image = await run_in_threadpool(decode_upload, data, name, self.model.preprocessing_, self.max_pixels,
                                                wants.regions, wants.heatmap)
            if width * height >= TRIM_AFTER_PIXELS:
                self.large_decodes += width * height
        except ImageError as exc:
            image = exc
        return name, image, time.perf_counter() - start

    async def decode_all(self, uploads: list[tuple[str, bytes]], wants: "Wants") -> list[tuple[str, object, float]]:
        """(name, serve.Upload or ImageError, seconds) for each upload, decoded in worker threads off the event loop;
        once no decode is left in flight after large ones, the freed memory goes back to the OS."""
        decoded = list(await asyncio.gather(*(self.decode_one(n, d, wants) for n, d in uploads)))
        if self.large_decodes and self.budget.in_use == 0:
            self.large_decodes = 0
            await run_in_threadpool(release_memory)
        return decoded

    async def score(self, uploads: list) -> tuple[list, object]:
        try:
            return await self.batcher.submit([upload.image for upload in uploads])
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None

    async def in_frame(self, upload, result, wants: "Wants", spent: dict) -> dict:
        """The parts of one image's reply in its own pixels (overlay, regions), drawn in a worker thread; their
        seconds are added to ``spent``."""
        if not (wants.heatmap or wants.regions):
            return {}
        parts, seconds = await run_in_threadpool(in_frame, self.model, upload, result, wants.heatmap, wants.regions)
        for key, value in seconds.items():
            spent[key] = spent.get(key, 0.0) + value
        return parts


class Wants:
    """What a request asks for beyond the score, checked before its upload is read."""

    def __init__(self, svc: InspectionService, heatmap: bool, regions: bool):
        if regions and svc.model.threshold_ is None:
            raise HTTPException(400, "regions need a threshold and this model has none (fitted with --holdout 0); "
                                     "ask without regions=true")
        self.heatmap, self.regions = heatmap, regions

    def timings(self, spent: dict) -> dict:
        """Milliseconds spent on what was asked for (0 when no image got that far)."""
        asked = [key for key, wanted in (("heatmap", self.heatmap), ("regions", self.regions)) if wanted]
        return {key: ms(spent.get(key, 0.0)) for key in asked}


def service(request: Request) -> InspectionService:
    return request.app.state.service


def named(result, name: str) -> str:
    """The model's error for an image, under the upload's name (the model only knows "<image 0>")."""
    prefix = f"{result.name}: "
    return f"{name}: {result.error[len(prefix):]}" if result.error.startswith(prefix) else result.error

def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


# ---------------------------------------------------------------------------------------------- routes
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
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(service(request).page)


@router.get("/health", summary="Liveness: answers while images are being scored")
async def health(request: Request) -> dict:
    batcher = service(request).batcher
    return {"status": "ok", "waiting": batcher.waiting, "batches_run": batcher.batches_run,
            "largest_batch": batcher.largest_batch}


@router.get("/v1/model", summary="What the loaded model is: backbone, input size, training count, threshold and "
                                 "its calibration")
async def model_info(request: Request) -> dict:
    return service(request).summary


REGIONS_HELP = ("Add the defect regions: boxes in the uploaded image's pixels (x, y, width, height), area and peak "
                "score; needs a threshold.")


@router.post("/v1/score", response_model=Score, response_model_exclude_unset=True, responses=errors_doc, openapi_extra=body_doc,
          summary="Score one image (multipart field 'file' or the raw body)")
async def score_one(request: Request,
                    heatmap: Annotated[bool, Query(description="Add the heatmap overlay (the uploaded image's size) as base64 PNG.")] = False,
                    regions: Annotated[bool, Query(description=REGIONS_HELP)] = False):
    start = time.perf_counter()
    svc = service(request)
    wants = Wants(svc, heatmap, regions)
    uploads = await svc.read_uploads(request, max_files=1)
    if len(uploads) != 1:
        raise HTTPException(400, f"{len(uploads)} files sent to /v1/score; use /v1/score/batch for several")
    name, upload, decode_s = (await svc.decode_all(uploads, wants))[0]
    if isinstance(upload, ImageError):
        raise HTTPException(413 if isinstance(upload, ImageTooLarge) else 422, str(upload))
    (result,), timing = await svc.score([upload])
    if result.error:  # unreadable, or a non-finite score (results.ScoredImage turns it into an error)
        raise HTTPException(422, named(result, name))
    label, flagged = svc.judge(result.score)
    response = {"name": name, "score": result.score, **readable_score(result), "verdict": label, "is_anomalous": flagged,
                "threshold": svc.model.threshold_, "batch_size": timing.batch_size}
    spent: dict = {}
    response.update(await svc.in_frame(upload, result, wants, spent))
    timings = {"decode": ms(decode_s), "queue": ms(timing.queue_s), "model": ms(timing.model_s),
               **wants.timings(spent), "total": ms(time.perf_counter() - start)}
    return {**response, "timings_ms": timings}


@router.post("/v1/score/batch", response_model=BatchScore, response_model_exclude_unset=True, responses=errors_doc, openapi_extra=batch_doc,
          summary="Score several images (repeated multipart field 'file') in one network batch")
async def score_many(request: Request,
                     heatmap: Annotated[bool, Query(description="Add heatmap overlays (each the uploaded image's size) as base64 PNG.")] = False,
                     regions: Annotated[bool, Query(description=REGIONS_HELP)] = False):
    start = time.perf_counter()
    svc = service(request)
    wants = Wants(svc, heatmap, regions)
    uploads = await svc.read_uploads(request, max_files=MAX_BATCH_FILES)
    decoded = await svc.decode_all(uploads, wants)
    readable = [(i, upload) for i, (_, upload, _) in enumerate(decoded) if not isinstance(upload, ImageError)]
    items = [{"name": name, "error": str(upload) if isinstance(upload, ImageError) else None}
             for name, upload, _ in decoded]
    if not readable:
        raise HTTPException(422, "no image could be read: " + "; ".join(item["error"] for item in items))
    results, timing = await svc.score([upload for _, upload in readable])
    spent: dict = {}
    for (i, upload), result in zip(readable, results):
        if result.error:
            items[i]["error"] = named(result, items[i]["name"])
            continue
        try:
            label, flagged = svc.judge(result.score)
        except FastpadimError as exc:  # no verdict for this image; the others keep theirs
            items[i]["error"] = f"{items[i]['name']}: {exc}"
            continue
        items[i].update(score=result.score, **readable_score(result), verdict=label, is_anomalous=flagged)
        items[i].update(await svc.in_frame(upload, result, wants, spent))
    timings = {"decode": ms(sum(d for _, _, d in decoded)), "queue": ms(timing.queue_s),
               "model": ms(timing.model_s), **wants.timings(spent), "total": ms(time.perf_counter() - start)}
    failed = sum(item["error"] is not None for item in items)
    return {"threshold": svc.model.threshold_, "batch_size": timing.batch_size, "scored": len(items) - failed,
            "failed": failed, "results": items, "timings_ms": timings}


async def fastpadim_error(_request: Request, exc: FastpadimError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


def create_app(model: object, model_path: str | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
               max_upload_mb: float = 20.0, max_queue: int = 256, max_pixels: int = MAX_IMAGE_PIXELS,
               max_decoding_pixels: int = MAX_DECODING_PIXELS) -> FastAPI:
    """The FastAPI application serving ``model``; the batcher starts and stops with the app's lifespan.

    ``max_pixels``: the most pixels in one image (checked from its header, before decoding; above: HTTP 413);
    ``max_decoding_pixels``: the most pixels decoded at once by all requests together (others wait their turn)."""
    check_options(max_batch, max_wait_ms, max_upload_mb, max_pixels, max_decoding_pixels)
    return build_app(InspectionService(model, model_path, max_batch, max_wait_ms, max_upload_mb, max_queue, max_pixels,
                                       max_decoding_pixels))


def build_app(svc: InspectionService) -> FastAPI:
    """The FastAPI application around ``svc``; the batcher starts and stops with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_app):
        svc.budget.open()
        await svc.batcher.start()
        try:
            yield
        finally:
            await svc.batcher.stop()

    api = FastAPI(title="fastpadim inspection service", version=svc.summary["fastpadim_version"], lifespan=lifespan,
                  description="PaDiM anomaly scores, verdicts and heatmaps for images posted by a line PC.")
    api.state.service = svc
    api.state.batcher = svc.batcher
    api.state.budget = svc.budget
    api.include_router(router)
    api.add_exception_handler(FastpadimError, fastpadim_error)
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
