"""The HTTP API of ``fastpadim serve`` (FastAPI): response models, the request pipeline and the scoring routes (the
line's routes, for versions, drift, metrics and the records, are ``fastpadim.http_line``).

One ``InspectionService`` per app holds the models (``ModelRegistry``, by name) and the limits; a request holds
its model for its whole life (a reload lets it finish there) and goes read (size limits) → header (pixel limit) →
a turn in the ``PixelBudget`` → decode in a worker thread → the model's ``MicroBatcher`` (one thread owns the
model) → verdict (``results.verdict``) → metrics, drift monitor and records (``serve.Recorder``, in a worker
thread). Routes are module-level and find the service on ``request.app.state``. Imported only when an app is
built, so the command line loads no FastAPI.
"""

# No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' types at run time.
import asyncio
import logging
import signal
import threading
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

from ._version import __version__
from .access import ApiKeyMiddleware, install_cors, install_offline_docs
from .batcher import PixelBudget, QueueFull
from .errors import FastpadimError, ImageError
from .images import MAX_IMAGE_PIXELS, ImageTooLarge, read_size
from .lineage import model_name
from .metrics import MetricsMiddleware, ServiceMetrics
from .model_registry import BatchLimits, ModelRegistry, NoSuchModel, ServedModel
from .recording import digest, inspection
from .http_line import NO_RECORDS, ModelQuery
from .http_line import router as line_router
from .serve import (
    MAX_BATCH_FILES, MAX_DECODING_PIXELS, MULTIPART_SLACK, RAW_TYPES, TRIM_AFTER_PIXELS, UPLOAD_HINT, Recorder,
    check_options, decode_upload, in_frame, readable_score, release_memory,
)

log = logging.getLogger("fastpadim.serve")


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
    model: str  # the served model's name
    model_version: int
    inspection_id: Optional[int] = None  # where the service records its verdicts (--record)

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
    inspection_id: Optional[int] = None

class BatchScore(BaseModel):
    threshold: Optional[float]
    batch_size: int
    scored: int
    failed: int
    model: str
    model_version: int
    results: list[BatchItem]
    timings_ms: Timings


# --------------------------------------------------------------------------------------------- service
class InspectionService:
    """The models behind the API (``ModelRegistry``), the limits that bound what a request may cost, and where
    verdicts go: the records (``recorder``, optional), the drift monitors and the metrics."""

    def __init__(self, registry: ModelRegistry, max_upload_mb: float, max_pixels: int, max_decoding_pixels: int,
                 recorder: Optional[Recorder] = None):
        self.registry = registry
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_pixels = max_pixels
        self.budget = PixelBudget(max_decoding_pixels)
        self.large_decodes = 0  # pixels of large images decoded since memory was last handed back
        self.page = (files("fastpadim") / "static" / "index.html").read_text(encoding="utf-8")
        self.recorder = recorder
        self.metrics = ServiceMetrics()

    def pick(self, name: Optional[str]) -> ServedModel:
        """The model a request names (``?model=``): HTTP 400 when several are served and none is named, 404 when
        none has that name."""
        try:
            return self.registry.get(name)
        except NoSuchModel as exc:
            raise HTTPException(404, str(exc)) from None
        except FastpadimError as exc:
            raise HTTPException(400, str(exc)) from None

    def use(self, name: Optional[str]):
        """``pick``, held for the request's life: a reload lets the request finish on this model."""
        self.pick(name)
        return self.registry.use(name)

    def records(self) -> Recorder:
        if self.recorder is None:
            raise HTTPException(404, NO_RECORDS)
        return self.recorder

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
                image = await run_in_threadpool(decode_upload, data, name, wants.model.preprocessing_,
                                                self.max_pixels, wants.regions, wants.heatmap)
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

    async def score(self, served: ServedModel, uploads: list) -> tuple[list, object]:
        try:
            return await served.batcher.submit([upload.image for upload in uploads])
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from None

    async def in_frame(self, upload, result, wants: "Wants", spent: dict) -> dict:
        """The parts of one image's reply in its own pixels (overlay, regions), drawn in a worker thread; their
        seconds are added to ``spent``."""
        if not (wants.heatmap or wants.regions):
            return {}
        parts, seconds = await run_in_threadpool(in_frame, wants.model, upload, result, wants.heatmap, wants.regions)
        for key, value in seconds.items():
            spent[key] = spent.get(key, 0.0) + value
        return parts

    def observe(self, served: ServedModel, verdict_: str, result=None) -> None:
        """A judged (or failed) image in the metrics, and its score in the model's drift monitor."""
        self.metrics.verdict(served.name, verdict_, result.normalized if result is not None else None)
        if result is not None:
            served.drift.observe(result.score)

    async def record(self, served: ServedModel, entries: list[tuple[str, bytes, object, dict]],
                     timings: dict) -> list[Optional[int]]:
        """Record each (name, bytes, ScoredImage or None, reply entry) in a worker thread; their ids, or None each
        when there are no records or writing failed (then logged: the reply is never lost to the records)."""
        if self.recorder is None:
            return [None] * len(entries)
        run, station = served.run, self.recorder.station

        def described() -> list:  # in the worker: hashing a full batch of uploads takes most of a second
            return [(inspection(result, run, path=name, source="serve", station=station, digest=digest(data),
                                image_path=None, regions=entry if entry.get("regions") is not None else None,
                                timings_ms=timings, error=entry.get("error")), data)
                    for name, data, result, entry in entries]

        try:
            return await run_in_threadpool(lambda: self.recorder.record(described()))
        except Exception as exc:  # noqa: BLE001 - the verdicts still go out
            log.error("RECORDING FAILED: %d verdict(s) of %s not written to %s: %s", len(entries), served.name,
                      self.recorder.records.url, exc, exc_info=exc)
            return [None] * len(entries)


class Wants:
    """What a request asks for beyond the score, and the model it runs on, checked before its upload is read."""

    def __init__(self, served: ServedModel, heatmap: bool, regions: bool):
        if regions and served.threshold is None:
            raise HTTPException(400, "regions need a threshold and this model has none (fitted with --holdout 0); "
                                     "ask without regions=true")
        self.model = served.model
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
    served = service(request).registry.models.values()
    return {"status": "ok", "waiting": sum(m.batcher.waiting for m in served),
            "batches_run": sum(m.batcher.batches_run for m in served),
            "largest_batch": max(m.batcher.largest_batch for m in served),
            "models": {m.name: m.version for m in served}}


@router.get("/v1/models", summary="The models served: name, version, the versions beside it on disk, threshold")
async def list_models(request: Request) -> dict:
    served = list(service(request).registry.models.values())
    return {"models": await run_in_threadpool(lambda: [m.describe() for m in served])}


@router.get("/v1/model", summary="What a served model is: name, version, backbone, input size, training count, "
                                 "threshold and its calibration")
async def model_info(request: Request, model: ModelQuery = None) -> dict:
    return service(request).pick(model).summary


REGIONS_HELP = ("Add the defect regions: boxes in the uploaded image's pixels (x, y, width, height), area and peak "
                "score; needs a threshold.")
HeatmapQuery = Annotated[bool, Query(description="Add the heatmap overlay (the uploaded image's size) as base64 PNG.")]
RegionsQuery = Annotated[bool, Query(description=REGIONS_HELP)]


@router.post("/v1/score", response_model=Score, response_model_exclude_unset=True, responses=errors_doc, openapi_extra=body_doc,
          summary="Score one image (multipart field 'file' or the raw body)")
async def score_one(request: Request, heatmap: HeatmapQuery = False, regions: RegionsQuery = False,
                    model: ModelQuery = None):
    start = time.perf_counter()
    svc = service(request)
    Wants(svc.pick(model), heatmap, regions)  # a bad request fails before its upload is read
    uploads = await svc.read_uploads(request, max_files=1)  # a slow upload holds no model (a reload retires it)
    if len(uploads) != 1:
        raise HTTPException(400, f"{len(uploads)} files sent to /v1/score; use /v1/score/batch for several")
    async with svc.use(model) as served:
        wants = Wants(served, heatmap, regions)
        name, upload, decode_s = (await svc.decode_all(uploads, wants))[0]
        data = uploads[0][1]
        if isinstance(upload, ImageError):
            await failed(svc, served, name, data, str(upload), {"decode": ms(decode_s)})
            raise HTTPException(413 if isinstance(upload, ImageTooLarge) else 422, str(upload))
        (result,), timing = await svc.score(served, [upload])
        if result.error:  # unreadable, or a non-finite score (results.ScoredImage turns it into an error)
            await failed(svc, served, name, data, named(result, name), {"decode": ms(decode_s)})
            raise HTTPException(422, named(result, name))
        label, flagged = served.judge(result.score)
        response = {"name": name, "score": result.score, **readable_score(result), "verdict": label,
                    "is_anomalous": flagged, "threshold": served.threshold, "batch_size": timing.batch_size,
                    "model": served.name, "model_version": served.version}
        spent: dict = {}
        response.update(await svc.in_frame(upload, result, wants, spent))
        timings = {"decode": ms(decode_s), "queue": ms(timing.queue_s), "model": ms(timing.model_s),
                   **wants.timings(spent), "total": ms(time.perf_counter() - start)}
        svc.observe(served, label, result)
        (inspection_id,) = await svc.record(served, [(name, data, result, response)], timings)
    if inspection_id is not None:
        response["inspection_id"] = inspection_id
    return {**response, "timings_ms": timings}


async def failed(svc: InspectionService, served: ServedModel, name: str, data: bytes, error: str,
                 timings: dict) -> None:
    """An upload that got no verdict, in the metrics and the records (verdict "error")."""
    svc.observe(served, "error")
    await svc.record(served, [(name, data, None, {"error": error})], timings)


@router.post("/v1/score/batch", response_model=BatchScore, response_model_exclude_unset=True, responses=errors_doc, openapi_extra=batch_doc,
          summary="Score several images (repeated multipart field 'file') in one network batch")
async def score_many(request: Request, heatmap: HeatmapQuery = False, regions: RegionsQuery = False,
                     model: ModelQuery = None):
    start = time.perf_counter()
    svc = service(request)
    Wants(svc.pick(model), heatmap, regions)  # a bad request fails before its uploads are read
    uploads = await svc.read_uploads(request, max_files=MAX_BATCH_FILES)  # slow uploads hold no model
    async with svc.use(model) as served:
        wants = Wants(served, heatmap, regions)
        decoded = await svc.decode_all(uploads, wants)
        readable = [(i, upload) for i, (_, upload, _) in enumerate(decoded) if not isinstance(upload, ImageError)]
        items = [{"name": name, "error": str(upload) if isinstance(upload, ImageError) else None}
                 for name, upload, _ in decoded]
        scored: list = [None] * len(items)
        if not readable:
            await record_batch(svc, served, uploads, scored, items, {"decode": ms(sum(d for _, _, d in decoded))})
            raise HTTPException(422, "no image could be read: " + "; ".join(item["error"] for item in items))
        results, timing = await svc.score(served, [upload for _, upload in readable])
        spent: dict = {}
        for (i, upload), result in zip(readable, results):
            if result.error:
                items[i]["error"] = named(result, items[i]["name"])
                continue
            try:
                label, flagged = served.judge(result.score)
            except FastpadimError as exc:  # no verdict for this image; the others keep theirs
                items[i]["error"] = f"{items[i]['name']}: {exc}"
                continue
            scored[i] = result
            items[i].update(score=result.score, **readable_score(result), verdict=label, is_anomalous=flagged)
            items[i].update(await svc.in_frame(upload, result, wants, spent))
        timings = {"decode": ms(sum(d for _, _, d in decoded)), "queue": ms(timing.queue_s),
                   "model": ms(timing.model_s), **wants.timings(spent), "total": ms(time.perf_counter() - start)}
        await record_batch(svc, served, uploads, scored, items, timings)
    failures = sum(item["error"] is not None for item in items)
    return {"threshold": served.threshold, "batch_size": timing.batch_size, "scored": len(items) - failures,
            "failed": failures, "model": served.name, "model_version": served.version, "results": items,
            "timings_ms": timings}


async def record_batch(svc: InspectionService, served: ServedModel, uploads: list[tuple[str, bytes]], scored: list,
                       items: list[dict], timings: dict) -> None:
    """A batch's images in the metrics, the drift monitor and the records; each item gets its inspection_id."""
    for result, item in zip(scored, items):
        svc.observe(served, item["verdict"] if result is not None else "error", result)
    entries = [(name, data, result, item) for (name, data), result, item in zip(uploads, scored, items)]
    for item, inspection_id in zip(items, await svc.record(served, entries, timings)):
        if inspection_id is not None:
            item["inspection_id"] = inspection_id


# ----------------------------------------------------------------------------- records and feedback
async def fastpadim_error(_request: Request, exc: FastpadimError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


def create_app(model: object = None, model_path: str | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
               max_upload_mb: float = 20.0, max_queue: int = 256, max_pixels: int = MAX_IMAGE_PIXELS,
               max_decoding_pixels: int = MAX_DECODING_PIXELS, *,
               models: Optional[dict[str, tuple[object, Optional[str]]]] = None, loader=None,
               recorder: Optional[Recorder] = None, api_key: Optional[str] = None, cors_origins: tuple = (),
               reload_on_hangup: bool = False) -> FastAPI:
    """The FastAPI application serving ``model`` (loaded from ``model_path``, if any), or several: ``models``,
    name → (model, file). The batchers start and stop with the app's lifespan.

    ``max_pixels``: the most pixels in one image (checked from its header, before decoding; above: HTTP 413);
    ``max_decoding_pixels``: the most pixels decoded at once by all requests together (others wait their turn).
    ``loader(path) -> model`` loads a version on reload (default ``fastpadim.load``); ``recorder`` records every
    verdict (``serve.Recorder``); ``api_key``: required from clients (``access.ApiKeyMiddleware``);
    ``cors_origins``: browser apps on these origins may call the API; ``reload_on_hangup``: SIGHUP reloads every
    model to its newest version (when the app runs in the main thread)."""
    check_options(max_batch, max_wait_ms, max_upload_mb, max_pixels, max_decoding_pixels)
    if (model is None) == (models is None):
        raise FastpadimError("serve either one model or several (models={name: (model, path)}), not both or none")
    if models is None:
        models = {model_name(model_path) if model_path else "model": (model, model_path)}
    registry = ModelRegistry(models, BatchLimits(max_batch, max_wait_ms / 1000.0, max_queue),
                             **({"loader": loader} if loader is not None else {}))
    svc = InspectionService(registry, max_upload_mb, max_pixels, max_decoding_pixels, recorder)
    return build_app(svc, api_key=api_key, cors_origins=cors_origins, reload_on_hangup=reload_on_hangup)


def build_app(svc: InspectionService, api_key: Optional[str] = None, cors_origins: tuple = (),
              reload_on_hangup: bool = False) -> FastAPI:
    """The FastAPI application around ``svc``; the batchers start and stop with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_app):
        svc.budget.open()
        await svc.registry.start()
        for served in svc.registry.models.values():
            svc.metrics.model_loaded(served.name, served.version)
        hangup = reload_on_hangup and on_hangup(svc.registry.reload_all)
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await svc.registry.stop()

    api = FastAPI(title="fastpadim inspection service", version=__version__, lifespan=lifespan,
                  description="PaDiM anomaly scores, verdicts and heatmaps for images posted by a line PC.",
                  docs_url=None, redoc_url=None)
    api.state.service = svc
    api.state.budget = svc.budget
    api.include_router(router)
    api.include_router(line_router)
    install_offline_docs(api)
    api.add_exception_handler(FastpadimError, fastpadim_error)
    api.add_middleware(UnexpectedErrors)  # innermost; Starlette's last added middleware is the outermost
    if api_key is not None:
        api.add_middleware(ApiKeyMiddleware, api_key=api_key)
    api.add_middleware(MetricsMiddleware, metrics=svc.metrics)  # refusals counted too
    install_cors(api, list(cors_origins))
    return api


def on_hangup(reload_all) -> bool:
    """SIGHUP runs ``reload_all`` on the running loop; False where signals cannot be handled here (not the main
    thread, or no SIGHUP on this system)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    tasks: set = set()

    def reload():
        task = loop.create_task(reload_all())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    return True


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
