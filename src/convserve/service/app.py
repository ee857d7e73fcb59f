"""``create_app(settings)``: the FastAPI inference service."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convserve import __version__
from convserve.jobs import JobQueue, JobSettings
from convserve.service.api import datasets, docs, jobs, predict, status, ui, v2
from convserve.service.api.deps import new_request_id
from convserve.service.decoding import Decoder
from convserve.service.manager import ModelManager
from convserve.service.metrics import Metrics
from convserve.service.model import providers_for
from convserve.service.settings import Settings

log = logging.getLogger(__name__)


# An over-limit upload is answered 413 at once, then its body is read and discarded for up to
# this long or this many bytes (nginx's "lingering close"), so that a client still writing it
# reads the answer instead of a reset connection.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024 * 1024
MAX_SERIES = 1024  # labelled request series EdgeMiddleware keeps at hand


class EdgeMiddleware:
    """Request ids, the upload size limit (413, with or without Content-Length) and HTTP
    metrics."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.upload_limit = (settings.max_upload_bytes, "CONVSERVE_MAX_UPLOAD_BYTES")
        self.dataset_limit = (settings.max_dataset_bytes, "CONVSERVE_MAX_DATASET_BYTES")

    def _limit(self, scope: Scope) -> tuple[int, str]:
        """Data set archives have their own, larger limit; every other body the upload's."""
        if scope["path"] == "/datasets" and scope.get("method") == "POST":
            return self.dataset_limit
        return self.upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        limit = self._limit(scope)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit[0]:
            await self._reject(scope, send, request_id, int(length), limit)
            await _linger(receive, min(int(length), LINGER_BYTES))
            self._observe(scope, 413, start)
            return
        status_code = await self._limited(scope, receive, send, request_id, limit)
        self._observe(scope, status_code, start)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, limit: tuple[int, str]
    ) -> int:
        """Run the app on a body counted as it streams (chunked uploads have no length): past
        the limit the app sees the body end, and its answer is replaced by the 413. A request
        whose client left before any answer is counted as 499 (nginx's "client closed")."""
        received, too_large, status_code = 0, False, 500
        started = gone = False

        async def limited_receive() -> Message:
            nonlocal received, too_large, gone
            if too_large:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit[0]:
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code, started
            if too_large:
                return  # the app's answer to a cut body is replaced by the 413 below
            if message["type"] == "http.response.start":
                status_code, started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        await self.app(scope, limited_receive, send_wrapper)
        if too_large:
            await self._reject(scope, send, request_id, received, limit)
            await _linger(receive, LINGER_BYTES)
            status_code = 413
        elif gone and not started:
            status_code = 499
        return status_code

    async def _reject(
        self, scope: Scope, send: Send, request_id: str, size: int, limit: tuple[int, str]
    ) -> None:
        response = JSONResponse(
            {
                "detail": f"the request body is {size} bytes or more; the limit is {limit[0]} "
                f"bytes ({limit[1]})"
            },
            status_code=413,
            headers={"x-request-id": request_id, "connection": "close"},
        )
        await response(scope, _empty_receive, send)

    def _observe(self, scope: Scope, status_code: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        key = (path, method, status_code)
        series = self._series.get(key)
        if series is None:  # the labelled series, looked up once per route, method and status
            series = (
                self.metrics.requests.labels(path, method, str(status_code)),
                self.metrics.latency.labels(path, method),
            )
            if len(self._series) < MAX_SERIES:  # a client's made-up methods are not kept
                self._series[key] = series
        series[0].inc()
        series[1].observe(time.perf_counter() - start)


async def _linger(receive: Receive, budget: int) -> None:
    """Read and discard what the client still sends, for a bounded time and size."""
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    while drained < budget:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Jobs:
    """The job queue and the MLflow client, as the API sees them. Both are made on the first
    jobs request: a server that only predicts never imports Huey, Redis's client or MLflow,
    never opens the tracking store, and its worker processes do not race to create a SQLite
    store at start-up."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self._queue: JobQueue | None = None
        self._client: Any = None
        # one lock each: the event loop reads the queue, while a worker thread may be
        # importing MLflow for the client (a second or more) under its lock
        self._queue_lock = threading.Lock()
        self._client_lock = threading.Lock()

    @property
    def queue(self) -> JobQueue:
        with self._queue_lock:
            if self._queue is None:
                self._queue = JobQueue(self.settings)
            return self._queue

    @property
    def client(self) -> Any:
        """Read it in a worker thread: its first use imports MLflow."""
        with self._client_lock:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient()
            return self._client


# Young-generation collections every this many allocations (CPython's default is 700): a
# request allocates a few hundred objects, and a collection costs the same whether it finds
# garbage or not.
GC_THRESHOLDS = (20_000, 20, 100)


def settle_memory() -> None:
    """Once start-up is done: collect the young generations, then move everything alive
    (modules, the model, the routes) to the permanent generation, which collections no longer
    traverse, and collect less often. Without it, a full collection walks every imported
    object every few seconds under load: a pause of tens of milliseconds that lands on the
    latency tail. No full collection here either: imports leave no cyclic garbage to find,
    and walking every object would delay the first answer by tens of milliseconds and, in a
    forked worker, write to every page it shares with its parent."""
    gc.collect(1)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Service(FastAPI):
    """The FastAPI app, with a few routes served directly: a request for one of them goes
    through ``EdgeMiddleware`` (request id, size limit, metrics) to its endpoint, which reads
    the ``Request`` itself, and an exception it raises is answered by the app's exception
    handlers, as on every other route. FastAPI's middleware stack, router and dependency
    resolution are skipped: on ``POST /predict`` of a small model they cost more than the
    model's inference. The route is declared once, as usual (``APIRouter``): OpenAPI describes
    it, the endpoint is the declared one, and a route whose endpoint takes anything but the
    ``Request`` is refused here."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._direct: dict[tuple[str, str], tuple[APIRoute, ASGIApp]] = {}

    def serve_directly(self, method: str, path: str, edge: Callable[[ASGIApp], ASGIApp]) -> None:
        """Serve ``method path`` directly, through ``edge`` (the middleware to keep)."""
        route = next(
            (
                r
                for r in _routes(self.router.routes)
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

    async def _answer_error(self, request: Request, err: Exception) -> Response:
        for cls in type(err).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                response = handler(request, err)
                return await response if inspect.isawaitable(response) else response
        log.exception("%s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            direct = self._direct.get((scope["method"], scope["path"]))
            # under a root path (a proxy's prefix), FastAPI's router resolves the path
            if direct is not None and not scope.get("root_path"):
                scope["app"] = self
                scope["route"] = direct[0]
                await direct[1](scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _routes(routes: list[Any]) -> Iterator[Any]:
    """Every route, those of included routers too (FastAPI keeps each router included without
    a prefix as one entry)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


def _is_v2(request: Request) -> bool:
    return request.url.path.startswith("/v2")


def create_app(settings: Settings, job_settings: JobSettings | None = None) -> Service:
    """The service; ``job_settings`` None reads the queue's settings from the environment now."""
    metrics = Metrics()
    cuda = "CUDAExecutionProvider" in providers_for(settings.device)  # cuda without CUDA fails
    # the processes and threads, where not set: this app as the only process unless
    # run_server resolved them for several
    settings = settings.model_copy(update={"workers": settings.workers or 1}).resolved(cuda)
    job_settings = job_settings if job_settings is not None else JobSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = ModelManager(settings, metrics)
        app.state.manager = manager
        app.state.decoder = Decoder(settings)
        app.state.jobs = Jobs(job_settings)
        outcome = await manager.check()
        if manager.model is None:
            log.warning("starting without a model: %s", outcome.message)
        poller = asyncio.create_task(manager.poll())
        settle_memory()
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await manager.close()
            app.state.decoder.close()

    app = Service(
        title="convserve",
        version=__version__,
        description="Image classification with onnxruntime: class probabilities and the "
        "feature maps of every convolutional block, a KServe v2 endpoint, hot reload of the "
        "registry's champion, and Prometheus metrics.",
        lifespan=lifespan,
        docs_url=None,  # served by api/docs.py from installed files, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(predict.router)
    app.include_router(status.router)
    app.include_router(v2.router)
    app.include_router(jobs.router)
    app.include_router(datasets.router)
    app.include_router(ui.router)
    app.include_router(docs.router)
    app.mount("/static", StaticFiles(directory=ui.STATIC), name="static")
    docs.mount_assets(app)
    _handlers(app)
    openapi = app.openapi

    def openapi_with_v2() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = v2.add_schemas(openapi())
        return app.openapi_schema

    app.openapi = openapi_with_v2  # type: ignore[method-assign]
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics)
    app.serve_directly(
        "POST", "/predict", partial(EdgeMiddleware, settings=settings, metrics=metrics)
    )
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(v2.V2Error)
    async def v2_error(request: Request, err: v2.V2Error) -> JSONResponse:
        return v2.error_response(err)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404, 405)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        headers = dict(err.headers or {})
        if err.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        if _is_v2(request):
            body: dict[str, Any] = {"error": str(err.detail)}
            return JSONResponse(body, status_code=err.status_code, headers=headers)
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems: list[dict[str, Any]] = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors()
        ]
        if _is_v2(request):
            text = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems)
            return JSONResponse({"error": text}, status_code=400)
        return JSONResponse({"detail": problems}, status_code=422)


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods some route answers on this path."""
    methods: set[str] = set()
    for route in _routes(app.router.routes):
        match, _ = route.matches({**scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or [])
    return sorted(methods)


def app_from_env() -> FastAPI:
    """For ``uvicorn convserve.service.app:app_from_env --factory``: settings from the
    environment (``convserve serve`` passes its settings objects instead)."""
    return create_app(Settings())
