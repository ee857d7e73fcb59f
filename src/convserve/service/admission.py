"""Admission control: what a request will cost is known before its work starts, and a
process takes on only so much heavy work at once, so that a client asking for a lot cannot
stall everyone else.

A request's cost, in units: one per image the model runs on (an occlusion explanation runs it
on one copy of the image per occluded region), plus one per ``BYTES_PER_UNIT`` of the answer
it will write (feature maps as arrays or PNG tiles, input PNGs, heat maps): an image's
inference and encoding 64 KB of JSON take about the same CPU time. A request of at most
``LIGHT_COST`` units that asks for no feature maps, input image or explanation (a few images'
probabilities) is light: admitted at once, on the fast path. Any other is heavy, admitted
while the heavy requests in flight in this process, itself included, cost at most the budget
(or when it is the only one: a request within the service's limits is never refused for
good). Otherwise it waits for the heavy requests in flight to finish, at most ``wait``
seconds (``CONVSERVE_ADMISSION_WAIT``, 0.5) and with at most ``MAX_WAITING`` others, then is
answered 503 with ``Retry-After`` and the reason: never left to wait longer. An admitted
heavy request does its decoding, inference and encoding in this process's heavy thread
(``decoding.py``: lower scheduling priority than the light requests' threads), off the
event loop.

The budget (``CONVSERVE_ADMISSION_BUDGET``, 0: chosen at start) is ``UNITS_PER_THREAD``
units per onnxruntime thread of the process, at most what keeps the answers in flight of
every worker process under ``MEMORY_SHARE`` of the machine's memory.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext

from fastapi import HTTPException

BYTES_PER_UNIT = 64 * 1024
LIGHT_COST = 8
UNITS_PER_THREAD = 256
MEMORY_SHARE = 1 / 16
RETRY_AFTER_SECONDS = 1
MAX_WAITING = 16


def request_cost(images: int, runs_per_image: int, answer_bytes: int) -> int:
    """Units: the model's runs, and the answer's size."""
    return images * runs_per_image + math.ceil(answer_bytes / BYTES_PER_UNIT)


def auto_budget(threads: int, workers: int) -> int:
    """Units per process for ``threads`` onnxruntime threads, capped by memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not Linux: no cap from memory
        memory = 1 << 40
    by_memory = int(memory * MEMORY_SHARE / max(workers, 1) / BYTES_PER_UNIT)
    return max(LIGHT_COST, min(UNITS_PER_THREAD * max(threads, 1), by_memory))


# a light request's admission: nothing to hold, one context for all of them (a generator's
# context manager, made and run through for each, cost more than the rest of admission)
_LIGHT = nullcontext(False)


class Admission:
    """The heavy requests in flight in one process, in units, against ``budget``."""

    def __init__(self, budget: int, wait: float = 0.5) -> None:
        self.budget, self.wait = budget, wait
        self.in_flight = 0
        self.waiting = 0
        self._released = asyncio.Condition()

    def _fits(self, cost: int) -> bool:
        return not self.in_flight or self.in_flight + cost <= self.budget

    def admitted(self, cost: int, what: str) -> AbstractAsyncContextManager[bool]:
        """Hold ``cost`` units while the block runs; enters as whether the request is heavy.
        Over budget after the wait: ``HTTPException`` 503 with ``Retry-After``."""
        return _LIGHT if cost <= LIGHT_COST else self._heavy(cost, what)

    @asynccontextmanager
    async def _heavy(self, cost: int, what: str) -> AsyncIterator[bool]:
        if not self._fits(cost):
            await self._wait(cost, what)
        self.in_flight += cost
        try:
            yield True
        finally:
            self.in_flight -= cost
            async with self._released:
                self._released.notify_all()

    async def _wait(self, cost: int, what: str) -> None:
        if self.waiting < MAX_WAITING:
            self.waiting += 1
            try:
                async with self._released:
                    await asyncio.wait_for(
                        self._released.wait_for(lambda: self._fits(cost)), self.wait
                    )
                return
            except TimeoutError:
                pass
            finally:
                self.waiting -= 1
        raise HTTPException(
            503,
            f"busy: heavy requests of {self.in_flight} units are being answered and this "
            f"one ({what}) costs {cost}; the budget is {self.budget} units a process "
            "(CONVSERVE_ADMISSION_BUDGET; a unit is an image the model runs on or 64 KB of "
            "answer); try again after Retry-After, or ask for less",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
