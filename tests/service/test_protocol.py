"""``JoinedWrites`` over a real TCP connection on loopback, the kernel counting what arrives."""

import asyncio
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from convserve.service.protocol import FLUSH_BYTES, JoinedWrites
from tests.waiting import limit, wait_until

# struct tcp_info's tcpi_data_segs_in (Linux 4.6+): the segments received that carried data
DATA_SEGS_IN = 152


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return int(struct.unpack_from("I", info, DATA_SEGS_IN)[0])


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


@contextmanager
def connection(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[JoinedWrites, socket.socket]]:
    """A ``JoinedWrites`` over the event loop's transport of one end of a TCP connection (no
    delay, as uvicorn's), and the other end, blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    client.settimeout(limit(10))  # a read that would block fails instead
    accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport, _ = loop.run_until_complete(loop.connect_accepted_socket(asyncio.Protocol, accepted))
    try:
        yield JoinedWrites(transport, loop), client  # type: ignore[arg-type]
    finally:
        transport.abort()
        client.close()


def one_turn(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


def arrived(client: socket.socket) -> bytes:
    """What has arrived, without waiting."""
    client.setblocking(False)
    try:
        return client.recv(1 << 20)
    except BlockingIOError:
        return b""
    finally:
        client.settimeout(limit(10))


def test_writes_in_one_turn_leave_in_one_segment_and_large_ones_at_once():
    loop = asyncio.new_event_loop()
    try:
        with connection(loop) as (joined, client):
            before = data_segments_in(client)
            joined.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            joined.write(b"{}")
            assert joined.get_write_buffer_size() > 0  # held until the turn ends
            one_turn(loop)
            assert read_exactly(client, 40) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
            assert data_segments_in(client) - before == 1
            # past FLUSH_BYTES it is written at once, before the turn ends
            joined.write(b"x" * (FLUSH_BYTES + 1))
            got = arrived(client)
            assert got and set(got) == {ord("x")}
            received = [got]

            def everything() -> bool:
                one_turn(loop)  # the transport sends what the socket did not take at once
                received.append(arrived(client))
                return sum(map(len, received)) >= FLUSH_BYTES + 1

            wait_until(everything, 10, "the large write arrived", 0.01)
            assert b"".join(received) == b"x" * (FLUSH_BYTES + 1)
    finally:
        loop.close()


def test_close_writes_what_is_pending_first_and_abort_drops_it():
    loop = asyncio.new_event_loop()
    try:
        with connection(loop) as (joined, client):
            joined.write(b"last words")
            joined.close()
            one_turn(loop)
            assert read_exactly(client, 10) == b"last words"
            assert client.recv(1) == b""  # then the end of the stream
            assert joined.is_closing()
        with connection(loop) as (joined, client):
            joined.write(b"never sent")
            joined.abort()
            one_turn(loop)
            try:
                got = client.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b""
    finally:
        loop.close()
