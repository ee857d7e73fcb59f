"""``Service``: the FastAPI app with a few routes served directly, past FastAPI's middleware
stack, router and dependency resolution."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


class Service(FastAPI):
    """The FastAPI app, with a few routes served directly: a request for one of them goes
    through ``EdgeMiddleware`` (request id, size limit, metrics) to its endpoint, which reads
    the ``Request`` itself, and an exception it raises is answered by the app's exception
    handlers, as on every other route. FastAPI's middleware stack, router and dependency
    resolution are skipped: on ``POST /predict`` of a small model they cost more than the
    model's inference. The route is declared once, as usual (``APIRouter``): OpenAPI describes
    it, the endpoint is the declared one, and a route whose endpoint takes anything but the
    ``Request`` is refused here. A path with parameters is matched by the route's pattern
    and its endpoint reads them from ``request.path_params``; the route declares them to
    OpenAPI itself (``openapi_extra``), since its endpoint does not."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # by method and declared path; a path with parameters is matched by its route
        self._direct: dict[tuple[str, str], tuple[APIRoute, ASGIApp]] = {}

    def serve_directly(self, method: str, path: str, edge: Callable[[ASGIApp], ASGIApp]) -> None:
        """Serve ``method path`` directly, through ``edge`` (the middleware to keep)."""
        route = next(
            (
                r
                for r in all_routes(self.router.routes)
                if isinstance(r, APIRoute) and r.path == path and method in (r.methods or set())
            ),
            None,
        )
        if route is None:
            raise ValueError(f"no route {method} {path} to serve directly")
        if list(inspect.signature(route.endpoint).parameters) != ["request"]:
            raise ValueError(f"{method} {path}: a direct route's endpoint takes only the request")
        endpoint: Callable[[Request], Awaitable[Response]] = route.endpoint

        async def direct(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            try:
                response = await endpoint(request)
            except ClientDisconnect:  # gone before its body arrived: no one to answer
                return
            except Exception as err:
                response = await self._answer_error(request, err)
            await response(scope, receive, send)

        self._direct[(method, path)] = (route, edge(direct))

    def _direct_route(self, scope: Scope) -> tuple[APIRoute, ASGIApp, dict[str, Any]] | None:
        """The directly served route of a request, with its path parameters (matched as
        Starlette's router matches them); None for the others."""
        plain = self._direct.get((scope["method"], scope["path"]))
        if plain is not None:
            return plain[0], plain[1], {}
        for (method, _), (route, app) in self._direct.items():
            if method == scope["method"] and route.param_convertors:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    return route, app, child["path_params"]
        return None

    async def _answer_error(self, request: Request, err: Exception) -> Response:
        for cls in type(err).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                response = handler(request, err)
                return await response if inspect.isawaitable(response) else response
        log.exception("%s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # under a root path (a proxy's prefix), FastAPI's router resolves the path
        if scope["type"] == "http" and not scope.get("root_path"):
            direct = self._direct_route(scope)
            if direct is not None:
                scope["app"] = self
                scope["route"], app, scope["path_params"] = direct
                await app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def all_routes(routes: list[Any]) -> Iterator[Any]:
    """Every route, those of included routers too (FastAPI keeps each router included without
    a prefix as one entry)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from all_routes(inner.routes)
        else:
            yield route
