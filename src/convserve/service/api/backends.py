"""Calls to the service's backends made for a request: MLflow (jobs, data sets, the page's
links) and the job queue (Redis or SQLite). They block, so they run in one pool of
``THREADS`` threads, never on the event loop; MLflow's HTTP connection pool holds as many
connections, so no call waits for or discards one. Each call is bounded in time
(``TIMEOUT_SECONDS``, no retries: the client retries after ``Retry-After``), and a backend
that fails or does not answer is a 503 that names it, never a 500 or a false 404."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import HTTPException

from convserve.redact import error_line

THREADS = 8
TIMEOUT_SECONDS = 10
RETRY_AFTER_SECONDS = 10
# MLflow's error codes that say the request was wrong, not that MLflow is unwell
_CLIENT_ERRORS = {
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_PARAMETER_VALUE",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}
T = TypeVar("T")


def bound_mlflow_client() -> None:
    """This process's MLflow client: ``TIMEOUT_SECONDS`` a request, no retries, a connection
    pool as large as the thread pool (the settings a user gave are kept). Called by
    ``convserve serve`` before its workers start: MLflow reads these at every request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(TIMEOUT_SECONDS))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_POOL_MAXSIZE", str(THREADS))


def not_found(err: BaseException) -> bool:
    """An MLflow answer that the thing asked for does not exist."""
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def backend_of(err: BaseException) -> str | None:
    """Which backend ``err`` says is unavailable ("MLflow", "the job queue"), or None for an
    error of the request itself or of the code."""
    module = type(err).__module__
    if module.startswith(("redis", "huey")) or isinstance(err, sqlite3.OperationalError):
        return "the job queue"
    if module.startswith("mlflow"):
        return None if getattr(err, "error_code", None) in _CLIENT_ERRORS else "MLflow"
    if module.startswith(("requests", "urllib3")) or isinstance(
        err, ConnectionError | TimeoutError
    ):
        return "MLflow"
    return None


def unavailable(backend: str, err: BaseException) -> HTTPException:
    return HTTPException(
        503,
        f"{backend} is unavailable ({error_line(err)}); try again later",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class Backends:
    """The thread pool of one worker process (made at its first call: after the fork)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="convserve-backend")
        return self._pool

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the pool; a backend's failure as a 503 naming it."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool(), fn, *args)
        except HTTPException:
            raise
        except Exception as err:
            backend = backend_of(err)
            if backend is None:
                raise
            raise unavailable(backend, err) from err

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
