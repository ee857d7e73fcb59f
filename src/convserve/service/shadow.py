"""Shadow runs off the response path, in a process of their own.

A challenger's mirrored requests run in a child process (``shadow_run``) at the lowest CPU
priority (``SCHED_IDLE``) with one operator thread: it takes the cycles the answering
processes leave idle, never their interpreter lock or their threads, and it imports numpy
and onnxruntime alone. The serving process copies a request's images into memory both
processes map (``SLOTS`` slots of ``SLOT_BYTES``) once its answer went out; the requests of
``FLUSH_SECONDS`` (or a slot's worth) are one batch, announced to the child by a small frame
on its stdin (the slot, the shape, the champion's answers); the child runs the challenger on
the slot and sends back how the two compare (agreement, confidences, the CPU time of its
run), counted in the challenger's ``Live`` with the champion's time. Nothing the size of the
images crosses the pipe or waits on the event loop: the copy is made a request at a time.
While ``BACKLOG`` batches are under way a request is not shadowed (counted as skipped): under
saturation the sample shrinks, and the champion's answers do not slow down. A request larger
than a slot is not shadowed either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import pickle
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convserve import contract
from convserve.service import shadow_run
from convserve.service.model import Source
from convserve.service.rollout import Live, Window
from convserve.service.shadow_run import BACKLOG, HEADER, SLOT_BYTES, SLOTS, frame

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.05  # how long a shadowed request waits for others to run with
RESTART_SECONDS = 30.0  # after a shadow process ended on its own, its next start at the soonest


@dataclass
class Item:
    """A request to shadow: its images, the champion's answer and its time per image."""

    batch: np.ndarray
    probs: np.ndarray
    champion_image_seconds: float


@dataclass
class _Batch:
    """The requests copied into one slot."""

    slot: int
    shape: tuple[int, ...] = ()
    images: int = 0
    used: int = 0  # bytes
    probs: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0


def _shared_memory() -> tuple[int, mmap.mmap]:
    """An anonymous file of ``SLOTS`` slots (memfd on Linux) and its map; the child gets the
    file descriptor. Nothing is left behind when both processes end."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("convserve-shadow")
    else:  # an unlinked temporary file elsewhere
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    os.ftruncate(fd, SLOTS * SLOT_BYTES)
    return fd, mmap.mmap(fd, SLOTS * SLOT_BYTES)


class Runner:
    """One challenger version's shadow process, the batch being filled and those under way
    (event loop only)."""

    def __init__(self, source: Source, live: Live, device: str) -> None:
        self.source, self.live, self.device = source, live, device
        # (images, the champion's seconds, frame), oldest first
        self.under_way: deque[tuple[int, float, bytes]] = deque()
        self.idle = asyncio.Event()
        self.idle.set()
        self.failed: str | None = None
        self.failed_at = 0.0  # time.monotonic()
        self.closing = False
        self._fd, self._memory = _shared_memory()
        self._floats = np.frombuffer(self._memory, np.float32)  # the slots, as one array
        self._filling = _Batch(slot=0)
        self._flush: asyncio.TimerHandle | None = None
        self._started = asyncio.Event()  # the process is up, or could not start
        self._proc: asyncio.subprocess.Process | None = None
        self._task = asyncio.create_task(self._serve())

    @property
    def state(self) -> str:
        """STARTING, RUNNING, or FAILED with the reason."""
        if self.failed is not None:
            return f"FAILED: {self.failed}"
        return "RUNNING" if self._proc is not None and self._proc.returncode is None else "STARTING"

    @property
    def behind(self) -> bool:
        """Whether ``BACKLOG`` batches of a running process are under way: a request now is
        skipped."""
        return self.failed is None and len(self.under_way) >= BACKLOG

    @property
    def _name(self) -> str:
        return f"{self.source.name} v{self.source.version}"

    def add(self, item: Item) -> None:
        """Copy ``item``'s images into the slot being filled (sent within ``FLUSH_SECONDS``,
        or at once when the next one does not fit)."""
        batch, images = item.batch, len(item.batch)
        size = batch.size * 4  # bytes, as float32
        if self.failed is not None:
            self.live.count(failures=images)
            return
        filling = self._filling
        if filling.images and (
            filling.used + size > SLOT_BYTES or filling.shape != batch.shape[1:]
        ):
            self.flush()
            filling = self._filling
        if self.behind or size > SLOT_BYTES:
            self.live.count(skipped=images)
            return
        start = (filling.slot * SLOT_BYTES + filling.used) // 4
        self._floats[start : start + batch.size] = batch.reshape(-1)
        filling.shape, filling.images = batch.shape[1:], filling.images + images
        filling.used += size
        filling.probs.append(item.probs)
        filling.seconds += item.champion_image_seconds * images
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """The slot being filled, to the child (once it is up); the next slot is filled."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch = self._filling
        if not batch.images:
            return
        probs = np.concatenate(batch.probs)
        message = frame((batch.slot, batch.images, batch.shape, probs))
        self.under_way.append((batch.images, batch.seconds, message))
        self.idle.clear()
        self._filling = _Batch(slot=(batch.slot + 1) % SLOTS)
        if self._proc is not None:  # else sent once the process is up
            self._send(message)

    def _send(self, message: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):  # gone: _serve counts them
            self._proc.stdin.write(message)

    async def _serve(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", shadow_run.__name__, str(self.source.path), str(self._fd),
                self.device, contract.INPUT, contract.PROBABILITIES,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                pass_fds=(self._fd,),
            )  # fmt: skip
            self._started.set()
            assert self._proc.stdout is not None
            for *_, message in self.under_way:
                self._send(message)
            while True:
                header = await self._proc.stdout.readexactly(HEADER.size)
                (size,) = HEADER.unpack(header)
                reply = pickle.loads(await self._proc.stdout.readexactly(size))
                self._count(*self.under_way.popleft()[:2], reply)
                if not self.under_way:
                    self.idle.set()
        except (asyncio.IncompleteReadError, OSError) as err:
            code = await self._proc.wait() if self._proc is not None else None
            self.failed = f"the shadow process of {self._name} ended: " + (
                f"exit status {code}" if code is not None else str(err)
            )
            self.failed_at = time.monotonic()
            if not self.closing:
                log.warning(
                    "%s; its shadow runs are counted as failures, and it starts again in %.0f s",
                    self.failed,
                    RESTART_SECONDS,
                )
        finally:
            self._started.set()
            self._give_up()

    def _give_up(self) -> None:
        """The batches under way that will not be answered, counted as failures."""
        for images, *_ in self.under_way:
            self.live.count(failures=images)
        self.under_way.clear()
        self.idle.set()

    def _count(self, images: int, champion_seconds: float, reply: Any) -> None:
        if isinstance(reply, str):  # the champion answered; the challenger's failure is counted
            self.live.count(failures=images)
            log.warning("shadow run on %s failed: %s", self._name, reply)
            return
        agree, challenger_confidence, champion_confidence, seconds = reply
        self.live.add(
            Window(
                requests=images,
                agree=agree,
                challenger_confidence=challenger_confidence,
                champion_confidence=champion_confidence,
                challenger_seconds=seconds,
                champion_seconds=champion_seconds,
            )
        )

    async def close(self) -> None:
        """End the process: it answers the batches under way (the one being filled sent
        first), then exits as its stdin closes; the reader counts those answers and ends at
        its end of file."""
        self.flush()
        self.closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._started.wait(), timeout=10)
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=10)
            if self._proc.returncode is None:
                self._proc.kill()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._give_up()  # a reader cancelled before it ran
        del self._floats  # the map's one export: it closes once none is left
        self._memory.close()
        os.close(self._fd)


def _restart(runner: Runner) -> bool:
    return runner.failed is not None and time.monotonic() - runner.failed_at >= RESTART_SECONDS


class Shadows:
    """Every challenger's runner in this process, by model name (one version each), on
    ``device`` (``CONVSERVE_DEVICE``)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.runners: dict[str, Runner] = {}
        self._closing: set[Runner] = set()  # replaced or retired, answering what they hold

    def add(self, source: Source, live: Live, item: Item) -> None:
        """Shadow ``item`` on the challenger loaded from ``source`` (its file in
        ``source.path``)."""
        self.start(source, live).add(item)

    def start(self, source: Source, live: Live) -> Runner:
        """The runner of the challenger loaded from ``source``, its process started now if it
        has none: a new version's runner replaces the last one's, and so does a new process
        ``RESTART_SECONDS`` after the last one ended on its own (killed, out of memory). The
        catalog starts it as the challenger loads, so that the process's start (its imports,
        the model's session) does not fall on the first requests shadowed."""
        runner = self.runners.get(source.name)
        if runner is None or runner.source != source or _restart(runner):
            if runner is not None:  # a new challenger version: the old process ends
                asyncio.get_running_loop().create_task(self._close(runner))
            runner = self.runners[source.name] = Runner(source, live, self.device)
        return runner

    def runner(self, source: Source) -> Runner | None:
        """The runner of the challenger loaded from ``source``, if it has one."""
        runner = self.runners.get(source.name)
        return runner if runner is not None and runner.source == source else None

    def behind(self, source: Source) -> bool:
        """Whether a request shadowed on the challenger loaded from ``source`` now would be
        skipped (``Runner.behind``)."""
        runner = self.runner(source)
        return runner is not None and runner.behind

    def flush(self) -> None:
        for runner in self.runners.values():
            runner.flush()

    async def done(self, timeout: float = 10) -> None:
        """Flush, and wait (at most ``timeout`` s) for every batch under way to be counted."""
        self.flush()
        waits = [asyncio.create_task(r.idle.wait()) for r in self.runners.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for task in pending:
                task.cancel()

    def under_way(self, name: str, version: str) -> bool:
        """Whether shadow runs of ``name`` version ``version`` are still to be counted."""
        runners = [*self.runners.values(), *self._closing]
        return any(
            (r.source.name, str(r.source.version)) == (name, version) and r.under_way
            for r in runners
        )

    async def _close(self, runner: Runner) -> None:
        self._closing.add(runner)
        try:
            await runner.close()
        finally:
            self._closing.discard(runner)

    async def retire(self, name: str) -> None:
        """``name`` has no challenger any more: its requests run, then its process ends."""
        runner = self.runners.pop(name, None)
        if runner is not None:
            await self._close(runner)

    async def close(self) -> None:
        for name in list(self.runners):
            await self.retire(name)
