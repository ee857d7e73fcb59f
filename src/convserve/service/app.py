"""``create_app(settings)``: the FastAPI inference service, put together: its routers, its
error handlers, the edge middleware (``edge.py``) around it and ``POST /predict`` served
directly (``direct.py``), the served set of models and the job queue made at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from convserve import __version__
from convserve.jobs import JobQueue, JobSettings
from convserve.redact import redacted
from convserve.service.admission import Admission
from convserve.service.api import datasets, docs, jobs, predict, repository, status, ui, v2
from convserve.service.api.backends import Backends
from convserve.service.catalog import Catalog, NotServed
from convserve.service.decoding import Decoder
from convserve.service.direct import Service, all_routes
from convserve.service.edge import EdgeMiddleware
from convserve.service.inference import V2Error
from convserve.service.metrics import Metrics
from convserve.service.sessions import providers_for
from convserve.service.settings import Settings

log = logging.getLogger(__name__)


T = TypeVar("T")


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
        self.backends = Backends()  # where the routes call the queue and MLflow

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` off the event loop, bounded; MLflow or the queue failing: 503."""
        return await self.backends.call(fn, *args)

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
                # the whole package, under the lock: its first request would import it from
                # whichever threads make one, and concurrent imports of a partly initialised
                # package fail ("partially initialized module 'mlflow'")
                import mlflow  # noqa: F401

                from convserve.training.tracking import mlflow_client

                self._client = mlflow_client()
            return self._client


# Young-generation collections every this many allocations (CPython's default is 700): a
# request allocates a few hundred objects, and a collection costs the same whether it finds
# garbage or not.
GC_THRESHOLDS = (20_000, 20, 100)
# The routes served past FastAPI's middleware stack, router and dependency resolution
# (``Service.serve_directly``): every prediction's path, image or tensor.
DIRECT_ROUTES = (
    "/predict",
    "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}/infer",
)
GRPC_GRACE_SECONDS = 10.0  # at shutdown, how long gRPC calls in flight may take to finish
# How long a thread holding the GIL keeps it once another asks (CPython's default: 5 ms):
# the event loop waits at most this long for a heavy request's thread (admission.py)
GIL_SWITCH_SECONDS = 0.0005


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


def _is_v2(request: Request) -> bool:
    return request.url.path.startswith("/v2")


@contextlib.asynccontextmanager
async def _lifespan(
    settings: Settings, job_settings: JobSettings, metrics: Metrics, app: FastAPI
) -> AsyncIterator[None]:
    """A worker process's start-up and shutdown: the served set of models (the default one
    loaded, the others loading, all followed), the decoder, the job queue, gRPC when asked
    for."""
    catalog = Catalog(settings, metrics)
    app.state.catalog = catalog
    app.state.decoder = Decoder(settings)
    app.state.admission = Admission(settings.admission_budget_units(), settings.admission_wait)
    app.state.jobs = Jobs(job_settings)
    app.state.ingests = datasets.Ingests()
    await catalog.start()
    if catalog.default.model is None:
        log.warning("starting without a model: %s", catalog.default.last_error)
    grpc_server = None
    if settings.grpc_port:  # imported only then: a process without gRPC never loads it
        from convserve.service.grpc_v2 import start_grpc

        grpc_server = await start_grpc(
            settings, catalog, metrics, app.state.admission, app.state.decoder.heavy
        )
    poller = asyncio.create_task(catalog.poll())
    app.state.draining = False
    if settings.shutdown_delay > 0:
        _drain_on_sigterm(app, settings.shutdown_delay)
    settle_memory()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    try:
        yield
    finally:
        if grpc_server is not None:  # calls in flight finish first, as HTTP's do
            await grpc_server.stop(GRPC_GRACE_SECONDS)
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await catalog.close()
        app.state.decoder.close()
        app.state.jobs.backends.shutdown()


def _drain_on_sigterm(app: FastAPI, delay: float) -> None:
    """Put a drain in front of uvicorn's SIGTERM handler (installed before the lifespan
    starts): the first SIGTERM makes ``/readyz`` answer 503 "draining" while every other
    route answers as before; ``delay`` seconds later uvicorn's handler stops listening, lets
    the requests in flight finish and ends the process. A second SIGTERM stops at once."""
    loop = asyncio.get_running_loop()
    uvicorn_handler = signal.getsignal(signal.SIGTERM)
    if not callable(uvicorn_handler):
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if app.state.draining:
            uvicorn_handler(signum, frame)
            return
        app.state.draining = True
        log.info("SIGTERM: draining; /readyz answers 503, stopping in %g s", delay)
        loop.call_soon_threadsafe(loop.call_later, delay, uvicorn_handler, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def create_app(settings: Settings, job_settings: JobSettings | None = None) -> Service:
    """The service; ``job_settings`` None reads the queue's settings from the environment now."""
    metrics = Metrics()
    cuda = "CUDAExecutionProvider" in providers_for(settings.device)  # cuda without CUDA fails
    # the processes and threads, where not set: this app as the only process unless
    # run_server resolved them for several
    settings = settings.model_copy(update={"workers": settings.workers or 1}).resolved(cuda)
    job_settings = job_settings if job_settings is not None else JobSettings()

    lifespan = partial(_lifespan, settings, job_settings, metrics)
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
    app.include_router(repository.router)
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
    edge = partial(EdgeMiddleware, settings=settings, metrics=metrics)
    for path in DIRECT_ROUTES:
        app.serve_directly("POST", path, edge)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(V2Error)
    async def v2_error(request: Request, err: V2Error) -> JSONResponse:
        return v2.error_response(err)

    @app.exception_handler(NotServed)  # a model not in the set, loading or failing
    async def not_served(request: Request, err: NotServed) -> JSONResponse:
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
        body = {"error": err.message} if _is_v2(request) else {"detail": err.message}
        return JSONResponse(body, status_code=err.status, headers=headers)

    @app.exception_handler(ClientDisconnect)  # gone while its body was read: no one to answer
    async def client_left(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404, 405)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        headers = dict(err.headers or {})
        if err.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        detail = redacted(err.detail)  # an error may quote a backend's URI
        if _is_v2(request):
            body: dict[str, Any] = {"error": str(detail)}
            return JSONResponse(body, status_code=err.status_code, headers=headers)
        return JSONResponse({"detail": detail}, status_code=err.status_code, headers=headers)

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
    for route in all_routes(app.router.routes):
        match, _ = route.matches({**scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or [])
    return sorted(methods)


def app_from_env() -> FastAPI:
    """For ``uvicorn convserve.service.app:app_from_env --factory``: settings from the
    environment (``convserve serve`` passes its settings objects instead)."""
    return create_app(Settings())
