"""The request body's read timeout (``edge.BodyDeadlines``): one timer for every request
waiting for a piece of its body, a request past its deadline answered as timed out, and a
request cancelled for another reason (the server stopping) still cancelled."""

import asyncio
import time

import pytest

from convserve.service.edge import BodyDeadlines

MESSAGE = {"type": "http.request", "body": b"x", "more_body": False}


def _client(delay: float):
    async def receive() -> dict:
        await asyncio.sleep(delay)
        return MESSAGE

    return receive


def test_a_piece_in_time_is_received_and_one_too_late_times_out():
    deadlines = BodyDeadlines(1.0)  # checked every 0.25 s

    async def scenario() -> None:
        assert await deadlines.receive(_client(0.0)) == MESSAGE
        start = time.monotonic()
        late, in_time = await asyncio.gather(
            deadlines.receive(_client(30.0)), deadlines.receive(_client(0.1))
        )
        took = time.monotonic() - start
        assert late is None and in_time == MESSAGE
        assert 1.0 <= took < 10.0, took  # at the deadline's first sweep, not the piece's 30 s
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the timeout left no cancel behind
        await asyncio.sleep(0.01)  # the request goes on: to answer its 408
        assert not deadlines.waiting and not deadlines.expired

    asyncio.run(scenario())
    asyncio.run(scenario())  # a second event loop (a test client's app): its own timer


def test_a_request_cancelled_elsewhere_is_not_taken_for_a_timeout():
    deadlines = BodyDeadlines(0.2)

    async def scenario() -> None:
        waiting = asyncio.create_task(deadlines.receive(_client(30.0)))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the server stopping, before the deadline
        with pytest.raises(asyncio.CancelledError):
            await waiting

        both = asyncio.create_task(deadlines.receive(_client(30.0)))
        await asyncio.sleep(0.05)
        deadlines.waiting[both] = 0.0  # past its deadline: cancelled by the next sweep,
        deadlines.sweep()
        both.cancel()  # and by the server before it ran again
        with pytest.raises(asyncio.CancelledError):
            await both
        assert not deadlines.waiting and not deadlines.expired

    asyncio.run(scenario())
