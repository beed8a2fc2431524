"""The routes: ``/v1`` (the API, on an ``APIRouter``) and the open ones (health, page, metrics, schema).

``POST /v1/predict`` wraps the screening stage and adds only HTTP: the upload is read (``upload.py``), decoded and
checked in the decode pool with ``pipeline.prepare``, queued for the batcher, which decides it with
``pipeline.decide`` in one network call with other requests' images; a file that cannot be read gets the stage's
own message. Heatmaps follow ``explain.wants_heatmap``, the rule of every route.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import html
import io
import logging
import time
from pathlib import Path
from typing import Annotated, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from .. import __version__
from ..data.images import FORMAT_NAMES, SUFFIXES
from ..errors import PneumoscanError
from ..pipeline import Prediction, Prepared, prepare
from .models import Health, ModelInfo, Screening, error_responses
from .state import Busy, Service
from .upload import HTTPError, Upload, read_upload

logger = logging.getLogger("pneumoscan.serve")

STATIC_DIR = Path(__file__).parent / "static"
DISPLAY_SIZE = 1024  # longest side of the preview and heatmap PNGs

SLOW_UPLOAD = "upload not received within {seconds:g} s"
BUSY = "server busy: too many requests in progress, retry shortly"
NO_HEATMAP = "heatmaps need the torch backend (Grad-CAM runs on the PyTorch network); this server has none"
INTERNAL = "internal server error"
NO_MODEL_CARD = "no model card for {name}: the card describes the bundled default model only"
NOT_JUDGED = "no heatmap: the model did not judge this image (status {status})"
NOT_POSITIVE = ("no heatmap: drawn for PNEUMONIA decisions only, this one is {decision} (heatmaps=all draws one "
                "for every judged image)")

_META_KEYS = ("name", "arch", "classes", "thresholds", "temperature", "target_sensitivity", "preprocessing",
              "validation", "guard", "precision", "version", "created")
_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"

# The upload is read by hand (upload.py), so its form is described here for the schema.
PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": f"chest X-ray: {FORMAT_NAMES}"}},
}}}}}


async def service(request: Request) -> Service:
    """The running app's ``Service`` (opened by the lifespan). Async: FastAPI would run a plain function in a
    worker thread."""
    return request.app.state.service


def bundled_model_card(model) -> str | None:
    """The model card's markdown when ``model`` is the bundled default (or an ONNX export of it), else None."""
    try:
        bundled = (_WEIGHTS / "default.sha256").read_text().split()[0]
        card = (_WEIGHTS / "model_card.md").read_text(encoding="utf-8")
    except (OSError, IndexError):
        return None
    source = getattr(getattr(model, "record", None), "source_sha256", None)
    return card if bundled in (model.sha256, source) else None


def ordered(thresholds: dict[str, float]) -> dict[str, float]:
    """Screening first, then balanced, then anything else: the order a reader meets them in."""
    rank = {"screening": 0, "balanced": 1}
    return {k: thresholds[k] for k in sorted(thresholds, key=lambda k: (rank.get(k, 2), k))}


ServiceDep = Annotated[Service, Depends(service)]


def get(router: APIRouter, path: str, **options):
    """``router.get``, and HEAD on the same path (HEAD wherever GET is allowed; kept out of the schema, where it
    would repeat the GET operation)."""
    def register(endpoint):
        router.get(path, **options)(endpoint)
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False,
                             **{k: v for k, v in options.items() if k in ("response_class", "response_model")})
        return endpoint

    return register


# ---- /v1 ------------------------------------------------------------------------------------------------------

api = APIRouter(prefix="/v1", responses=error_responses((401, "missing or invalid API key (when keys are on)")))


@get(api, "/model", response_model=ModelInfo,
     summary="metadata of the served model: thresholds, calibration, preprocessing, validation")
async def model_info(svc: ServiceDep) -> dict:
    model, s = svc.model, svc.settings
    record = model.record.to_dict()
    info = {key: record[key] for key in _META_KEYS if key in record}
    info.update(
        name=model.name, sha256=model.sha256, thresholds=ordered(model.thresholds), temperature=model.temperature,
        bias=model.bias,
        prevalence={"fitted": model.fitted_prevalence, "used": model.prevalence or model.fitted_prevalence},
        backend=model.backend.name, runtime=model.runtime, heatmap=svc.heatmap_ok,
        max_upload_bytes=s.max_upload_bytes, formats=FORMAT_NAMES,
        batching={**s.batching, "max_pending": s.max_pending},
        model_card="/v1/model/card" if bundled_model_card(model) is not None else None,
    )
    return info


@get(api, "/model/card", response_class=Response, summary="the bundled model's model card",
     responses={200: {"content": {"text/markdown": {}}}, **error_responses((404, "not the bundled model"))})
async def model_card(svc: ServiceDep) -> Response:
    card = bundled_model_card(svc.model)
    if card is None:
        raise HTTPError(404, NO_MODEL_CARD.format(name=svc.model.name))
    return Response(card, media_type="text/markdown; charset=utf-8")


@api.post(
    "/predict", summary="screen one chest X-ray", response_model=Screening, response_model_exclude_unset=True,
    openapi_extra=PREDICT_BODY,
    responses=error_responses(
        (400, "malformed request"), (408, "upload not received in time"), (413, "upload too large"),
        (415, f"not one of the accepted formats ({FORMAT_NAMES})"), (422, "unreadable image or invalid parameter"),
        (500, "internal error"), (501, "heatmap asked of a server without the torch backend"),
        (503, "server busy: retry after the Retry-After seconds")),
)
async def predict(
    request: Request,
    response: Response,
    svc: ServiceDep,
    threshold: str = Query("screening", description="screening | balanced | a number in (0, 1)"),
    heatmap: bool = Query(False, description="add a Grad-CAM overlay as heatmap_png_base64 (see heatmaps)"),
    heatmaps: Literal["positive", "all"] = Query(
        "positive", description="which images get one: positive (PNEUMONIA decisions, the default of every "
                                "route) or all (every judged image)"),
    preview: bool = Query(False, description="add the decoded image as image_png_base64 (for display)"),
) -> dict:
    started = time.perf_counter()
    audit = request.scope.get("pneumoscan.audit", {})
    model = svc.model
    try:
        op = model.resolve_threshold(threshold)
    except PneumoscanError as exc:
        raise HTTPError(422, str(exc)) from None
    if heatmap and not svc.heatmap_ok:
        raise HTTPError(501, NO_HEATMAP)
    try:
        with svc.admit() as handed_over:
            upload, prepared, timing = await _receive(request, svc, audit, started)
            handed_over()
            queued = time.perf_counter()
            try:
                scored = await svc.batcher.decide(prepared, op)
            except Exception:
                logger.exception("scoring failed for request %s", audit.get("request_id"))
                raise HTTPError(500, INTERNAL) from None
            pred = scored.screened.prediction
            timing["inference"] = time.perf_counter() - queued
            extra: dict = {}
            if heatmap or preview:
                work = svc.decoders.submit(_extras, model, prepared, pred, heatmaps if heatmap else None, preview)
                try:
                    more, extra = await asyncio.wrap_future(work)
                except Exception:
                    logger.exception("heatmap or preview failed for request %s", audit.get("request_id"))
                    raise HTTPError(500, INTERNAL) from None
                timing.update(more)
    except Busy:
        raise HTTPError(503, BUSY, headers={"Retry-After": "1"}) from None
    svc.metrics.predictions.labels(pred.status).inc()
    facts = scored.screened.facts()
    audit.update(prediction=pred.status, probability=pred.probability, decision=pred.decision,
                 operating_point=pred.operating_point, threshold=pred.threshold, prevalence=model.prevalence,
                 facts=facts)
    if svc.drift is not None:
        svc.drift.submit(facts)  # a queue put: the figures are computed in the monitor's own thread
    timing["total"] = time.perf_counter() - started
    thresholds = ordered(model.thresholds)
    decisions = None
    if pred.status == "ok":
        decisions = {name: model.classes[int(pred.probability >= value)] for name, value in thresholds.items()}
    response.headers["Cache-Control"] = "no-store"
    return {
        "filename": upload.filename, "probability": pred.probability, "decision": pred.decision,
        "operating_point": pred.operating_point, "threshold": pred.threshold, "thresholds": thresholds,
        "decisions": decisions, "status": pred.status, "message": pred.message, "guard_score": pred.guard_score,
        "model": svc.model_ref, "timing_ms": {k: round(v * 1000.0, 2) for k, v in timing.items()},
        "batch_size": scored.batch_size, "request_id": audit.get("request_id"), **extra,
    }


async def _receive(request: Request, svc: Service, audit: dict, started: float) -> tuple[Upload, Prepared, dict]:
    """The upload read within the upload timeout, then decoded and checked by the stage; HTTPError otherwise."""
    s = svc.settings
    try:
        with anyio.fail_after(s.upload_timeout):
            upload = await read_upload(request, s.max_upload_bytes)
    except TimeoutError:
        raise HTTPError(408, SLOW_UPLOAD.format(seconds=s.upload_timeout)) from None
    uploaded = time.perf_counter()
    audit["upload_bytes"] = len(upload.data)
    prepared, seconds = await asyncio.wrap_future(svc.decoders.submit(_prepare, svc.model, upload, audit))
    if prepared.error is not None:  # the stage's message; 415 when the bytes are none of the accepted formats
        svc.metrics.predictions.labels("error").inc()
        raise HTTPError(415 if upload.format is None and upload.data else 422, prepared.error)
    return upload, prepared, {"upload": uploaded - started, "decode": seconds}


def _prepare(model, upload: Upload, audit: dict) -> tuple[Prepared, float]:
    """Decode and check one upload with the stage (decode pool; blocking, CPU-bound). Bytes of none of the accepted
    formats go in too: ``decode`` opens only those formats, so they fail at once, with the stage's message."""
    start = time.perf_counter()
    audit["upload_sha256"] = hashlib.sha256(upload.data).hexdigest()
    prepared = prepare(model, upload.data, name=upload.filename)
    return prepared, time.perf_counter() - start


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _gray(image: np.ndarray) -> Image.Image:
    """The decoded image as 8-bit gray: lets the page show DICOMs, which browsers cannot decode."""
    return Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), "L")


def _extras(model, prepared: Prepared, pred: Prediction, rule: str | None, preview: bool) -> tuple[dict, dict]:
    """The heatmap (``rule`` set: asked for) and the preview PNGs (decode pool)."""
    from ..explain import display_copy, gradcam_overlay, wants_heatmap

    timing: dict[str, float] = {}
    extra: dict[str, str | None] = {}
    if rule is not None:
        start = time.perf_counter()
        if wants_heatmap(pred, rule):
            overlay = gradcam_overlay(model, prepared.decoded.pixels, DISPLAY_SIZE)
            extra.update(heatmap_png_base64=_png_base64(overlay), heatmap_reason=None)
        else:
            why = NOT_JUDGED.format(status=pred.status) if pred.status != "ok" else \
                NOT_POSITIVE.format(decision=pred.decision)
            extra.update(heatmap_png_base64=None, heatmap_reason=why)
        timing["heatmap"] = time.perf_counter() - start
    if preview and prepared.decoded is not None:
        extra["image_png_base64"] = _png_base64(_gray(display_copy(prepared.decoded.pixels, DISPLAY_SIZE)))
    return timing, extra


# ---- open routes ----------------------------------------------------------------------------------------------

public = APIRouter()


@get(public, "/healthz", response_model=Health, summary="liveness and the model being served")
async def healthz(svc: ServiceDep) -> dict:
    return {"status": "ok", "version": __version__, "model": svc.model_ref}


@get(public, "/metrics", include_in_schema=False)
async def metrics(svc: ServiceDep) -> Response:
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


@get(public, "/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@functools.cache
def page() -> str:
    """The page, with the accepted formats filled in from the one list (``data.images``)."""
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    accept = ",".join([*sorted(SUFFIXES), "image/*", "application/dicom"])
    return text.replace("{{FORMAT_NAMES}}", html.escape(FORMAT_NAMES)).replace("{{ACCEPT}}", html.escape(accept))


@get(public, "/", include_in_schema=False, response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(page())
