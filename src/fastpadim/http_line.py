"""The HTTP routes of ``fastpadim serve`` for a line: switching model versions, drift, Prometheus metrics, and the
records' inspections (listed, their kept images, the operators' labels). The scoring routes and the request
pipeline are ``fastpadim.http_api``, which includes this router; routes find the service on ``request.app.state``.
"""

# No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' types at run time.
from typing import Annotated, Optional

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .errors import FastpadimError
from .kept_images import media_type
from .model_registry import NoSuchModel
from .records.inspection import LABELS

MAX_LISTED = 500  # inspections in one GET /v1/inspections
router = APIRouter()


def service(request: Request):
    """The app's ``http_api.InspectionService``."""
    return request.app.state.service


ModelQuery = Annotated[Optional[str], Query(description="The model to use, by name (GET /v1/models); needed when "
                                                          "several are served.")]


class ReloadRequest(BaseModel):
    model: Optional[str] = None  # needed when several models are served
    version: Optional[int] = None  # a version file beside the served one; default: the newest


@router.post("/v1/model/reload", summary="Load another version of a served model (default: the newest file beside "
                                         "it) and switch to it without dropping a request",
             responses={404: {"description": "no such model or version"}, 422: {"description": "the file failed "
                                                                                                "to load"}})
async def reload_model(request: Request, body: Optional[ReloadRequest] = None) -> dict:
    svc, body = service(request), body or ReloadRequest()
    svc.pick(body.model)
    try:
        done = await svc.registry.reload(body.model, body.version)
    except NoSuchModel as exc:
        raise HTTPException(404, str(exc)) from None
    svc.metrics.model_loaded(done["model"], done["version"])
    return done


@router.get("/v1/drift", summary="Whether the images scored lately still look like the model's good images")
async def drift(request: Request, model: ModelQuery = None) -> dict:
    served = service(request).pick(model)
    return {"model": served.name, "model_version": served.version,
            **await run_in_threadpool(served.drift.status)}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    svc = service(request)
    for served in list(svc.registry.models.values()):
        svc.metrics.model_loaded(served.name, served.version)
        svc.metrics.drift(served.name, await run_in_threadpool(served.drift.status))
    body, content_type = svc.metrics.render()
    return Response(body, media_type=content_type)


NO_RECORDS = "this service keeps no records; start it with --record DB"


class LabelRequest(BaseModel):
    label: Optional[str]  # one of records.LABELS, or null to clear it
    by: Optional[str] = Field(None, max_length=200)  # who labelled it


@router.get("/v1/inspections", summary="The latest recorded verdicts, newest first, with links to kept images")
async def list_inspections(request: Request, model: Optional[str] = None, verdict: Optional[str] = None,
                           labelled: Optional[bool] = None, limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = 50,
                           before_id: Optional[int] = None) -> dict:
    recorder = service(request).records()
    found = await run_in_threadpool(recorder.recent, limit=limit, model=model, verdict=verdict, labelled=labelled,
                                    before_id=before_id)
    return {"inspections": found, "record": recorder.records.url}


@router.get("/v1/inspections/{inspection_id}/image", summary="The kept copy of an inspected image, as uploaded",
            response_class=FileResponse)
async def inspection_image(request: Request, inspection_id: int) -> FileResponse:
    recorder = service(request).records()
    try:
        path = await run_in_threadpool(recorder.image, inspection_id)
    except FastpadimError as exc:
        raise HTTPException(404, str(exc)) from None
    if path is None:
        raise HTTPException(404, f"no kept image of inspection {inspection_id}")
    return FileResponse(path, media_type=media_type(path))


@router.post("/v1/inspections/{inspection_id}/label", summary="An operator's word on a verdict: false_alarm, "
                                                               "confirmed_defect, or null to clear it")
async def label_inspection(request: Request, inspection_id: int, body: LabelRequest) -> dict:
    svc = service(request)
    if svc.recorder is None:
        raise HTTPException(409, NO_RECORDS)
    if body.label is not None and body.label not in LABELS:
        raise HTTPException(422, f"label must be one of {', '.join(LABELS)} or null, got {body.label!r}")
    try:
        return await run_in_threadpool(svc.recorder.label, inspection_id, body.label, body.by)
    except FastpadimError as exc:
        raise HTTPException(404 if str(exc).startswith("no inspection") else 422, str(exc)) from None
