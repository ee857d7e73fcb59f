"""uvicorn's httptools protocol with an answer's head and body leaving in one send.

uvicorn writes an answer's status line and headers when the app sends ``http.response.start``
and its body when the app sends ``http.response.body``: two sends, so two TCP segments, and on
a connection within the machine (a load balancer, a sidecar, a benchmark) the kernel does the
receiving side's work for each in the sending process. A worker sampled at concurrency 32 on
a 64x64 model spent a tenth of its time in the first of those sends. Here the writes made in
one turn of the event loop are joined and sent once, at the end of that turn; past
``FLUSH_BYTES`` they are sent at once, so that a large or streamed body is not held back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_BYTES = 64 * 1024


class JoinedWrites:
    """A transport whose ``write`` calls within one turn of the loop become one write to
    ``transport``; everything else is ``transport``'s own, after what is pending is written
    (``close``, ``write_eof``) or dropped (``abort``)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._size = self._pending, [], 0
        if not self._transport.is_closing():  # gone meanwhile: nobody to send it to
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending, self._size = [], 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def __getattr__(self, name: str) -> Any:  # get_extra_info, is_closing, pause_reading, ...
        return getattr(self._transport, name)


class JoinedHttpTools(HttpToolsProtocol):
    """``HttpToolsProtocol`` writing through ``JoinedWrites``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(JoinedWrites(transport, self.loop))  # type: ignore[arg-type]
