"""Dependencies as ``Annotated`` aliases (full-stack-fastapi-template ``api/deps.py``)."""

from __future__ import annotations

import itertools
import os
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from convserve.service.catalog import Catalog
from convserve.service.decoding import Decoder
from convserve.service.metrics import Metrics, process_id
from convserve.service.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


async def get_decoder(request: Request) -> Decoder:
    decoder: Decoder = request.app.state.decoder
    return decoder


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
DecoderDep = Annotated[Decoder, Depends(get_decoder)]


_bearer = HTTPBearer(auto_error=False, description="CONVSERVE_API_TOKEN")


async def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer token check in constant time; the token itself is never logged."""
    expected = settings.api_token.get_secret_value() if settings.api_token else None
    headers = {"WWW-Authenticate": "Bearer"}
    if not expected:
        raise HTTPException(
            401, "this server has no CONVSERVE_API_TOKEN set: writes are disabled", headers=headers
        )
    if credentials is None:
        raise HTTPException(
            401, "missing bearer token (Authorization: Bearer <token>)", headers=headers
        )
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(401, "invalid bearer token", headers=headers)


TokenDep = Annotated[None, Depends(require_token)]


_ids: tuple[int, str, itertools.count[int]] | None = None


def new_request_id() -> str:
    """32 hex digits, unique per process and across processes: 80 random bits drawn once per
    process, then a counter (no system call per request, as ``uuid4`` makes)."""
    global _ids
    pid = process_id()
    if _ids is None or _ids[0] != pid:  # first use, or a forked worker
        _ids = (pid, os.urandom(10).hex(), itertools.count())
    return f"{_ids[1]}{next(_ids[2]):012x}"
