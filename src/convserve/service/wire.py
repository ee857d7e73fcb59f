"""One send for a response's head and body.

uvicorn's HTTP protocol writes a response's status line and headers as soon as the app starts
the response, and its body when the app sends it: two sends, so two TCP segments, and a
client that reads the head, parses it and waits to read again for the body. Every answer of
this service is a head and one body, sent by the app one right after the other, so
``HeadWithBody`` holds the head back until the body's first piece and hands both to the
socket at once. A head is never held past the event loop's current turn: a streamed response
whose first piece takes longer sends its head alone, as before. Nothing is reordered or
dropped: ``close`` sends what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadWithBody:
    """An asyncio transport that holds a response's head (``HTTP/1.1 <status>`` up to the
    blank line; not a ``100 Continue``, which the client waits for) until the next write or
    the end of the event loop's turn, and sends the two as one write; anything else goes
    straight through."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))  # one send (uvloop: a vectored write)
        elif data[-4:] == b"\r\n\r\n" and data[:9] == b"HTTP/1.1 " and data[9:10] != b"1":
            self._held = bytes(data)
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send the held head, if any."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else: the transport's own
        return getattr(self._transport, name)


class OneSendHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through ``HeadWithBody``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport))  # type: ignore[arg-type]
