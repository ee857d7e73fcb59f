"""Health, readiness, the models being served, metrics and the admin reload."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from convserve.redact import redact
from convserve.service.api.deps import CatalogDep, MetricsDep, TokenDep
from convserve.service.api.errors import errors
from convserve.service.rollout import Criteria, Shares
from convserve.service.schemas import (
    Health,
    LivePromotion,
    ModelInfo,
    ReloadResult,
    Rollout,
    RolloutRequest,
    ServedModels,
)

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"], summary="Liveness")
async def healthz(catalog: CatalogDep) -> Health:
    """Answers 200 while the process serves HTTP, with the default model's version (null
    while it is not loaded yet)."""
    model = catalog.default.model
    return Health(status="alive", model_version=model.source.version if model else None)


@router.get(
    "/readyz",
    response_model=Health,
    tags=["health"],
    responses={
        503: {"model": Health, "description": "Default model not loaded and warmed, or draining"}
    },
    summary="Ready once the default model is loaded, warmed up and self-checked",
)
async def readyz(request: Request, catalog: CatalogDep) -> Response:
    """200 once the default model (``CONVSERVE_MODEL_URI``) is loaded, warmed up and
    self-checked (use it as a readiness probe); 503 with the reason before that, and while
    the process drains after SIGTERM (``CONVSERVE_SHUTDOWN_DELAY``). The other models load in
    the background: ``GET /v1/models`` says where each stands."""
    manager = catalog.default
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
    summary="A model being served (the default one unless `model` names another)",
    responses=errors(404, 503, e404="A model this server does not serve", e503="Not loaded (yet)"),
)
async def model_info(
    catalog: CatalogDep,
    model: Annotated[
        str | None, Query(description="A model's name (GET /v1/models); default: the default")
    ] = None,
) -> ModelInfo:
    """The version being served, where it comes from, its classes, its input and feature-map
    shapes, the execution providers in use and its own metadata."""
    engine = catalog.engine(model)
    manager = catalog.models[engine.model.source.name]
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
    "/v1/models",
    response_model=ServedModels,
    response_model_exclude_none=True,
    tags=["model"],
    summary="Every model this server serves, and where each stands",
)
async def models(catalog: CatalogDep) -> ServedModels:
    """Each model of the served set (``CONVSERVE_MODEL_URI`` and ``CONVSERVE_MODELS``): its
    version, alias, data set, registered metrics, state (READY, LOADING, UNLOADED: loads on its
    next request, UNAVAILABLE: with the reason) and the memory it takes in this worker process,
    against ``CONVSERVE_MODEL_MEMORY_MB``."""
    return ServedModels(
        default=catalog.default.name,
        memory_budget_bytes=catalog.budget or None,
        memory_in_use_bytes=catalog.memory_in_use(),
        registry_error=catalog.discovery_error,
        models=catalog.describe(),  # type: ignore[arg-type]
    )


@router.put(
    "/v1/models/{name}/rollout",
    response_model=Rollout,
    response_model_exclude_none=True,
    tags=["model"],
    summary="Shadow or canary a model's challenger on live traffic",
    responses=errors(
        400, 401, 404, e400="Not a registered model", e404="A model this server does not serve"
    ),
)
async def set_rollout(
    name: Annotated[str, Path(description="A served model's name")],
    body: RolloutRequest,
    catalog: CatalogDep,
    _: TokenDep,
) -> Any:
    """In every worker process: ``shadow``, the share of ``name``'s requests also sent to its
    challenger (the version at its ``challenger`` alias) once the champion has answered;
    ``canary``, the share its challenger answers instead. Both 0 stop it. What the challenger
    shows is counted per process (``GET /v1/models``) and logged to its run as ``live.*``
    metrics every CONVSERVE_ROLLOUT_LOG_SECONDS."""
    await catalog.set_rollout(name, Shares(body.shadow, body.canary))
    return catalog.rollout(name) or {"shadow": 0.0, "canary": 0.0, "state": "off"}


@router.post(
    "/admin/models/{name}/promote",
    response_model=LivePromotion,
    tags=["admin"],
    summary="Promote a model's challenger on its live evidence",
    responses=errors(401, 404, 503, e404="No such model, or it has no challenger"),
)
async def promote_live(
    name: Annotated[str, Path(description="A registered model's name")],
    catalog: CatalogDep,
    _: TokenDep,
    min_requests: Annotated[int, Query(ge=1, description="Shadowed images at least")] = 100,
    min_agreement: Annotated[
        float, Query(ge=0, le=1, description="Agreement with the champion at least")
    ] = 0.9,
    max_latency_ratio: Annotated[
        float, Query(gt=0, description="Challenger's inference time over the champion's at most")
    ] = 1.5,
) -> LivePromotion:
    """As ``convserve promote``: reads every ``live.*`` window on the challenger's run (this
    process's own are logged first), and moves ``champion`` to it when it was shadowed on at
    least ``min_requests`` images, agreed with the champion on at least ``min_agreement`` of
    them and took at most ``max_latency_ratio`` times the champion's inference time. The
    decision and the evidence go to the version's tags and description either way; a
    promotion is served at once by every worker process."""
    criteria = Criteria(min_requests, min_agreement, max_latency_ratio)
    decision = await catalog.promote(name, criteria)
    return LivePromotion(
        promoted=decision.promoted,
        model=name,
        version=decision.version,
        previous_champion=decision.previous_champion,
        reason=decision.reason,
        evidence=asdict(decision.evidence),
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
    summary="Check the registry now and swap to the version each model's URI names",
    responses=errors(401, 404, e404="A model this server does not serve"),
)
async def reload(
    catalog: CatalogDep,
    _: TokenDep,
    force: Annotated[
        bool,
        Query(description="Reload even the version being served, and retry a refused one"),
    ] = False,
    model: Annotated[
        str | None,
        Query(
            description="Only this model; default: every model in memory (the answer is "
            "the default model's)"
        ),
    ] = None,
) -> ReloadResult:
    """``force=true`` reloads even the same version, and retries a refused one. With several
    worker processes, the one that answers reloads now and the others within a second."""
    outcome = await catalog.reload(model, force=force)
    return ReloadResult(
        model=model or catalog.default.name,
        changed=outcome.changed,
        version=outcome.version,
        message=outcome.message,
    )
