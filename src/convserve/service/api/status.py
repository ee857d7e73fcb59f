"""Health, readiness, the model being served, metrics and the admin reload."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from convserve.redact import redact
from convserve.service.api.deps import EngineDep, ManagerDep, MetricsDep, TokenDep
from convserve.service.api.errors import errors
from convserve.service.schemas import Health, ModelInfo, ReloadResult

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"], summary="Liveness")
async def healthz(manager: ManagerDep) -> Health:
    """Answers 200 while the process serves HTTP, with the version being served (null while
    no model is loaded yet)."""
    model = manager.model
    return Health(status="alive", model_version=model.source.version if model else None)


@router.get(
    "/readyz",
    response_model=Health,
    tags=["health"],
    responses={503: {"model": Health, "description": "No model loaded and warmed, or draining"}},
    summary="Ready once a model is loaded, warmed up and self-checked",
)
async def readyz(request: Request, manager: ManagerDep) -> Response:
    """200 once a model is loaded, warmed up and self-checked (use it as a readiness probe);
    503 with the reason before that, and while the process drains after SIGTERM
    (``CONVSERVE_SHUTDOWN_DELAY``)."""
    problems = manager.problems() or None
    if getattr(request.app.state, "draining", False):
        body = Health(status="not ready", detail="draining: shutting down", not_served=problems)
        return JSONResponse(body.model_dump(), status_code=503)
    if manager.model is None:
        detail = manager.last_error or "no model loaded yet"
        body = Health(status="not ready", detail=detail, not_served=problems)
        return JSONResponse(body.model_dump(), status_code=503)
    version = manager.model.source.version
    return JSONResponse(
        Health(status="ready", model_version=version, not_served=problems).model_dump()
    )


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    tags=["model"],
    summary="The model being served",
    responses=errors(503, e503="No model loaded yet"),
)
async def model_info(engine: EngineDep, manager: ManagerDep) -> ModelInfo:
    """The version being served, where it comes from, its classes, its input and feature-map
    shapes, the execution providers in use and its own metadata."""
    m = engine.model
    s = m.source
    return ModelInfo(
        name=s.name,
        version=s.version,
        alias=s.alias,
        run_id=s.run_id,
        uri=redact(s.uri),
        labels=m.labels,
        input={
            "name": m.meta.input.name,
            "dtype": m.meta.input.dtype,
            "shape": [-1, m.channels, m.height, m.width],
            "range": list(m.meta.input.range),
        },
        color_mode=m.meta.color_mode,
        feature_outputs=m.feature_shapes,
        opset=m.meta.opset,
        providers=m.providers,
        loaded_at=datetime.fromtimestamp(m.loaded_at, UTC).isoformat(),
        metadata=m.meta,
        not_served=manager.problems(),
    )


@router.get(
    "/metrics",
    tags=["metrics"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": "# HELP convserve_inference_images_total Images inferred\n"
                    "# TYPE convserve_inference_images_total counter\n"
                    "convserve_inference_images_total 1234.0\n"
                }
            }
        }
    },
)
async def metrics(metrics: MetricsDep) -> Response:
    """Requests by route and status, latency, batch sizes, queue and inference time, images,
    rejected uploads, model reloads and refusals, and the model being served, in Prometheus'
    text format."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/admin/reload",
    response_model=ReloadResult,
    tags=["admin"],
    summary="Check the registry now and swap to the version the model URI names",
    responses=errors(401),
)
async def reload(
    manager: ManagerDep,
    _: TokenDep,
    force: Annotated[
        bool,
        Query(description="Reload even the version being served, and retry a refused one"),
    ] = False,
) -> ReloadResult:
    """``force=true`` reloads even the same version, and retries a refused one. With several
    worker processes, the one that answers reloads now and the others within a second."""
    outcome = await manager.reload(force=force)
    return ReloadResult(changed=outcome.changed, version=outcome.version, message=outcome.message)
