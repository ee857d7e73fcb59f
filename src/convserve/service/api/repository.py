"""The model repository API, as Triton's (its ``model_repository`` extension of KServe v2):
the index of the served set, and loading and unloading a model by name. Loads and unloads
need the bearer token (``CONVSERVE_API_TOKEN``); with several worker processes every one of
them follows (``catalog.py``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel, Field

from convserve.service.api.deps import CatalogDep, TokenDep
from convserve.service.api.errors import errors

router = APIRouter(prefix="/v2/repository", tags=["model repository"])

Name = Annotated[str, Path(description="A registered model's name")]


class IndexRequest(BaseModel):
    ready: bool = Field(False, description="Only the models that are ready")

    model_config = {"strict": True, "json_schema_extra": {"examples": [{"ready": True}]}}


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: Literal["READY", "LOADING", "UNLOADED", "UNAVAILABLE"]
    reason: str = ""


class LoadParameters(BaseModel):
    version: str | None = Field(
        None,
        pattern=r"^\d+$",
        description="A registered version to serve, pinned; default: the version at the "
        "default model's alias (champion), followed",
    )


class LoadRequest(BaseModel):
    parameters: LoadParameters = Field(default_factory=LoadParameters)

    model_config = {
        "strict": True,
        "json_schema_extra": {"examples": [{"parameters": {"version": "3"}}, {}]},
    }


_INDEX_EXAMPLE = [
    {"name": "convserve", "version": "4", "state": "READY", "reason": ""},
    {"name": "my-shapes", "version": "2", "state": "LOADING", "reason": ""},
    {
        "name": "old-digits",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "unloaded by an admin",
    },
]
_DONE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Done", "content": {"application/json": {"example": {}}}}
}


@router.post(
    "/index",
    summary="The served set of models",
    response_model=list[IndexEntry],
    responses={
        200: {"content": {"application/json": {"example": _INDEX_EXAMPLE}}},
        **errors(400, v2=True, e400="A body that is not {'ready': true|false}"),
    },
)
async def index(
    catalog: CatalogDep,
    request: Annotated[IndexRequest | None, Body(examples=[{"ready": True}])] = None,
) -> list[dict[str, Any]]:
    """Each model with its version and state (READY, LOADING, UNLOADED: loads on its next
    request, UNAVAILABLE: with the reason), as Triton's repository index answers."""
    entries = [
        {
            "name": m["name"],
            "version": m.get("version"),
            "state": m["state"],
            "reason": m.get("reason") or "",
        }
        for m in catalog.describe()
    ]
    if request is not None and request.ready:
        entries = [e for e in entries if e["state"] == "READY"]
    return entries


_ADMIN_ERRORS = errors(
    400,
    401,
    404,
    v2=True,
    e400="The model cannot be loaded (the reason says why), or is the default model",
    e404="A model this server does not serve",
)


@router.post("/models/{name}/load", summary="Load a model", responses={**_DONE, **_ADMIN_ERRORS})
async def load(
    name: Name,
    catalog: CatalogDep,
    _: TokenDep,
    request: Annotated[
        LoadRequest | None, Body(examples=[{"parameters": {"version": "3"}}, {}])
    ] = None,
) -> dict[str, Any]:
    """Serve the registered model ``name`` in every worker process: at the default model's
    alias (followed from then on), or at ``parameters.version`` (pinned). Answers once it is
    loaded, warmed up and self-checked here; a model that fails is not added (400 with why).
    An admin load keeps a model in the set until it is unloaded."""
    version = request.parameters.version if request is not None else None
    await catalog.load(name, version)
    return {}


@router.post(
    "/models/{name}/unload", summary="Unload a model", responses={**_DONE, **_ADMIN_ERRORS}
)
async def unload(name: Name, catalog: CatalogDep, _: TokenDep) -> dict[str, Any]:
    """Stop serving ``name`` in every worker process (requests in flight finish); it stays
    out of the set, whatever ``CONVSERVE_MODELS`` matches, until it is loaded again. The
    default model is not unloaded."""
    await catalog.unload(name)
    return {}
