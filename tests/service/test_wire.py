"""A response's head goes out with its body in one write (``wire.py``), through uvicorn's own
HTTP protocol on a real socket; nothing is held past the event loop's turn or lost at close."""

import asyncio
import socket

import pytest

from convserve.jobs import JobSettings
from convserve.service.server import _config
from convserve.service.settings import Settings
from convserve.service.wire import HeadWithBody, OneSendHttpToolsProtocol

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


class Recording(asyncio.Transport):
    """A transport that records each write as one send."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def writelines(self, list_of_data) -> None:  # type: ignore[no-untyped-def]
        self.sends.append(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_a_head_is_sent_with_its_body_and_never_held_past_the_loop_s_turn():
    async def scenario() -> None:
        raw = Recording()
        transport = HeadWithBody(raw)
        transport.write(HEAD)
        assert raw.sends == []  # held
        transport.write(b"hello")
        assert raw.sends == [HEAD + b"hello"]
        # a head whose body does not come in this turn (a stream's first piece) goes alone
        transport.write(HEAD)
        await asyncio.sleep(0)
        assert raw.sends[-1] == HEAD
        transport.write(b"hello")
        assert raw.sends[-1] == b"hello"
        # a 100 Continue is what the client waits for: never held
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert raw.sends[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
        # closing sends what is held first; the rest is the transport's own
        transport.write(HEAD)
        transport.close()
        assert raw.sends[-1] == HEAD and raw.closed
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)

    asyncio.run(scenario())


def test_the_service_s_protocol_answers_http_over_a_real_socket():
    """uvicorn's protocol with ``HeadWithBody``: keep-alive requests in a row, a HEAD (a head
    and no body), a 100 Continue before the body, and a bad request's 400, each answered in
    full."""
    import uvicorn

    assert _config(Settings(), JobSettings()).http is OneSendHttpToolsProtocol

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = b"got " + body
        headers = [(b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    config = uvicorn.Config(app, http=OneSendHttpToolsProtocol, lifespan="off", log_level="error")

    async def scenario() -> None:
        server = uvicorn.Server(config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for body in (b"one", b"two"):
                writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n" + body)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and b"content-length: 7" in head
                assert await reader.readexactly(7) == b"got " + body
            writer.write(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200") and b"content-length: 4" in head
            writer.write(
                b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n"
            )
            continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert continued == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"three")
            head = await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(9) == b"got three"
            writer.write(b"NOT HTTP\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
            assert answer.startswith(b"HTTP/1.1 400")
            assert answer.endswith(b"Invalid HTTP request received.")
            writer.close()
        finally:
            server.should_exit = True
            await task

    asyncio.run(scenario())


@pytest.mark.parametrize("data", [b"", b"HTTP/1.1 200 OK\r\n", b"\r\n\r\n"])
def test_what_is_not_a_head_goes_straight_through(data):
    async def scenario() -> None:
        raw = Recording()
        HeadWithBody(raw).write(data)
        assert raw.sends == [data]

    asyncio.run(scenario())
