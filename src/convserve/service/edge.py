"""The edge of every request: its id, the upload size limit (with a lingering close) and the
request metrics, as ASGI middleware around the app and around each directly served route."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convserve.service.api.deps import new_request_id
from convserve.service.metrics import Metrics
from convserve.service.settings import Settings

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
        self.body_deadlines = BodyDeadlines(settings.body_read_timeout)
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
            budget = min(int(length), LINGER_BYTES)
            await _reject(send, receive, request_id, int(length), limit, budget)
            self._observe(scope, 413, start)
            return
        status_code = await self._limited(scope, receive, send, request_id, limit)
        self._observe(scope, status_code, start)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, limit: tuple[int, str]
    ) -> int:
        """Run the app on a body counted as it streams (chunked uploads have no length): past
        the limit the app sees the body end, and its answer is replaced by the 413. A body
        whose next piece does not come within ``body_deadlines.seconds`` is a 408 (the app sees the
        client leave). A request whose client left before any answer is counted as 499
        (nginx's "client closed")."""
        received, too_large, timed_out, status_code = 0, False, False, 500
        started = gone = body_done = False

        async def limited_receive() -> Message:
            nonlocal received, too_large, timed_out, gone, body_done
            if too_large:
                return {"type": "http.request", "body": b"", "more_body": False}
            # after the body, a wait for the client to leave: no timeout
            message = await (receive() if body_done else self.body_deadlines.receive(receive))
            if message is None:
                timed_out = True
                return {"type": "http.disconnect"}
            gone = gone or message["type"] == "http.disconnect"
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit[0]:
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code, started
            if too_large or timed_out:
                return  # the app's answer to a cut body is replaced by the 413 or 408 below
            if message["type"] == "http.response.start":
                status_code, started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        await self.app(scope, limited_receive, send_wrapper)
        if too_large:
            await _reject(send, receive, request_id, received, limit, LINGER_BYTES)
            status_code = 413
        elif timed_out and not started:
            detail = (
                f"no part of the request body came for {self.body_deadlines.seconds:g} s "
                "(CONVSERVE_BODY_READ_TIMEOUT)"
            )
            await _answer(send, 408, {"detail": detail}, request_id)
            status_code = 408
        elif gone and not started:
            status_code = 499
        return status_code

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


class BodyDeadlines:
    """The requests waiting for their body's next piece, each with its deadline, checked
    every ``tick`` seconds by one timer on the event loop: a piece awaited costs an entry in
    a dictionary, where a timer of its own (``asyncio.timeout``: a handle made, scheduled and
    cancelled for every piece, almost always already received) cost 6% of the CPU of a small
    prediction. A request past its deadline is cancelled where it waits, and ``receive``
    answers None for it; a timeout fires between ``seconds`` and ``seconds + tick``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tick = min(1.0, seconds / 4)
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def receive(self, receive: Receive) -> Message | None:
        """``receive()``'s message, or None where none came within ``seconds``."""
        task = asyncio.current_task()
        assert task is not None
        self.waiting[task] = time.monotonic() + self.seconds
        loop = task.get_loop()
        if self._timer is None or self._loop is not loop:  # (a test's app meets new loops)
            self._loop, self._timer = loop, loop.call_later(self.tick, self.sweep)
        try:
            return await receive()
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            self.expired.discard(task)
            if task.uncancel():  # cancelled from elsewhere as well: the server stopping
                raise
            return None
        finally:
            self.waiting.pop(task, None)

    def sweep(self) -> None:
        now = time.monotonic()
        for task, deadline in list(self.waiting.items()):
            if deadline <= now:
                del self.waiting[task]
                self.expired.add(task)
                task.cancel()
        self._timer = None
        if self.waiting and self._loop is not None:
            self._timer = self._loop.call_later(self.tick, self.sweep)


async def _reject(
    send: Send, receive: Receive, request_id: str, size: int, limit: tuple[int, str], budget: int
) -> None:
    """The 413, then the rest of the body read and discarded (``_linger``) before the answer
    is ended: the server closes the connection once the answer ends, and a close with unread
    data in the socket resets it, so that a client that writes its whole body before reading
    would see a reset instead of the 413."""
    detail = f"the request body is {size} bytes or more; the limit is {limit[0]} bytes ({limit[1]})"
    await _answer(send, 413, {"detail": detail}, request_id, ended=False)
    await _linger(receive, budget)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _answer(
    send: Send, status: int, content: dict[str, Any], request_id: str, ended: bool = True
) -> None:
    """A JSON answer that closes the connection; ``ended=False`` leaves it open for a last
    (empty) part of the body."""
    body = json.dumps(content).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": not ended})


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
