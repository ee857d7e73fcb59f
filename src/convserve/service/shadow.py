"""Shadow runs off the response path, in a process of their own.

A challenger's mirrored requests run in a child process (``python -m
convserve.service.shadow MODEL.onnx FD``) at the lowest CPU priority (``SCHED_IDLE``), one
operator thread: it takes the cycles the answering processes leave idle, never their
interpreter lock or their threads. The serving process copies a request's images into a
memory both processes map (``SLOTS`` slots of ``SLOT_BYTES``) once its answer went out; the
requests of ``FLUSH_SECONDS`` (or a slot's worth) are one batch, announced to the child by a
small frame on its stdin (the slot, the shape, the champion's answers and time); the child runs
the challenger on the slot, compares (agreement, confidences, the CPU time of its run against
the champion's time) and sends that back on its stdout, to be counted in the challenger's
``Live``. Nothing the size of the images crosses the pipe or waits on the event loop: the
copy is made a request at a time. While ``BACKLOG`` batches are under way a request is not
shadowed (counted as skipped): under saturation the sample shrinks, and the champion's answers
do not slow down. A request larger than a slot is not shadowed either.

A frame is a 4-byte little-endian length, then a pickle: to the child ``(slot, images,
(C, H, W), champion probabilities, champion seconds)``, back the comparison
(``rollout.Window.compared``) or an error's text. Both ends are this module, in processes of
the same service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import pickle
import struct
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from convserve import contract
from convserve.service.rollout import Live, Window

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.05  # how long a shadowed request waits for others to run with
SLOT_BYTES = 2 << 20  # one batch's images at most (float32)
BACKLOG = 8  # batches under way in a challenger's process before requests are skipped
SLOTS = BACKLOG + 1  # those under way, and the one being filled
NICE = 19  # the child's CPU priority where SCHED_IDLE is missing
_HEADER = struct.Struct("<I")


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


def _frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


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

    def __init__(self, model_key: tuple[str, str, str], path: Path, live: Live) -> None:
        self.key, self.path, self.live = model_key, path, live
        self.under_way: deque[tuple[int, bytes]] = deque()  # (images, frame), oldest first
        self.idle = asyncio.Event()
        self.idle.set()
        self.failed: str | None = None
        self.closing = False
        self._fd, self._memory = _shared_memory()
        self._filling = _Batch(slot=0)
        self._flush: asyncio.TimerHandle | None = None
        self._started = asyncio.Event()  # the process is up, or could not start
        self._proc: asyncio.subprocess.Process | None = None
        self._task = asyncio.create_task(self._serve())

    def add(self, item: Item) -> None:
        """Copy ``item``'s images into the slot being filled (sent within ``FLUSH_SECONDS``,
        or at once when the next one does not fit)."""
        batch, images = item.batch, len(item.batch)
        if self.failed is not None:
            self.live.count(failures=images)
            return
        filling = self._filling
        if filling.images and (
            filling.used + batch.nbytes > SLOT_BYTES or filling.shape != batch.shape[1:]
        ):
            self.flush()
            filling = self._filling
        if len(self.under_way) >= BACKLOG or batch.nbytes > SLOT_BYTES:
            self.live.count(skipped=images)
            return
        offset = filling.slot * SLOT_BYTES + filling.used
        np.ndarray(batch.shape, np.float32, buffer=self._memory, offset=offset)[...] = batch
        filling.shape, filling.images = batch.shape[1:], filling.images + images
        filling.used += images * int(np.prod(filling.shape)) * 4
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
        frame = _frame((batch.slot, batch.images, batch.shape, probs, batch.seconds))
        self.under_way.append((batch.images, frame))
        self.idle.clear()
        self._filling = _Batch(slot=(batch.slot + 1) % SLOTS)
        if self._proc is not None:  # else sent once the process is up
            self._send(frame)

    def _send(self, frame: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):  # gone: _serve counts them
            self._proc.stdin.write(frame)

    async def _serve(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, str(self.path), str(self._fd),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                pass_fds=(self._fd,),
            )  # fmt: skip
            self._started.set()
            assert self._proc.stdout is not None
            for _, frame in self.under_way:
                self._send(frame)
            while True:
                header = await self._proc.stdout.readexactly(_HEADER.size)
                (size,) = _HEADER.unpack(header)
                reply = pickle.loads(await self._proc.stdout.readexactly(size))
                self._count(self.under_way.popleft()[0], reply)
                if not self.under_way:
                    self.idle.set()
        except (asyncio.IncompleteReadError, OSError) as err:
            code = await self._proc.wait() if self._proc is not None else None
            self.failed = f"the shadow process of {self.key[0]} v{self.key[1]} ended: " + (
                f"exit status {code}" if code is not None else str(err)
            )
            if not self.closing:
                log.warning("%s; its shadow runs are counted as failures", self.failed)
        finally:
            self._started.set()
            self._give_up()

    def _give_up(self) -> None:
        """The batches under way that will not be answered, counted as failures."""
        for images, _ in self.under_way:
            self.live.count(failures=images)
        self.under_way.clear()
        self.idle.set()

    def _count(self, images: int, reply: Any) -> None:
        if isinstance(reply, str):  # the champion answered; the challenger's failure is counted
            self.live.count(failures=images)
            log.warning("shadow run on %s v%s failed: %s", self.key[0], self.key[1], reply)
            return
        self.live.add(reply)

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
        self._memory.close()
        os.close(self._fd)


class Shadows:
    """Every challenger's runner in this process, by model name (one version each)."""

    def __init__(self) -> None:
        self.runners: dict[str, Runner] = {}
        self._closing: set[Runner] = set()  # replaced or retired, answering what they hold

    def add(self, name: str, model_key: tuple[str, str, str], live: Live, item: Item) -> None:
        """Shadow ``item`` on ``name``'s challenger (``model_key``: its name, version and
        file); a new version's runner replaces the last one's."""
        runner = self.runners.get(name)
        if runner is None or runner.key != model_key:
            if runner is not None:  # a new challenger version: the old process ends
                asyncio.get_running_loop().create_task(self._close(runner))
            runner = self.runners[name] = Runner(model_key, Path(model_key[2]), live)
        runner.add(item)

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
        return any(r.key[:2] == (name, version) and r.under_way for r in runners)

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


def _read(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(size))


def _lowest_priority() -> None:
    """SCHED_IDLE where the system has it (Linux): a waking answering process always takes
    the core from this one, which runs on what is left (a share of weight 3 against 1024);
    else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(NICE)


def main(path: str, fd: int) -> int:
    """The child: load the challenger, then answer batches until stdin closes (at the lowest
    priority from its first batch on: the load is done once, at the usual one)."""
    from convserve.service.model import _session
    from convserve.service.settings import Settings

    settings = Settings().model_copy(update={"intra_op_threads": 1, "inter_op_threads": 1})
    try:
        session = _session(Path(path), settings)
    except Exception as err:
        print(f"shadow: {err}", file=sys.stderr)
        return 2
    memory = mmap.mmap(fd, SLOTS * SLOT_BYTES)
    # the run's CPU time, not its wait for a core at the lowest priority (on a GPU: its time)
    clock = time.perf_counter if "CUDAExecutionProvider" in session.get_providers() else None
    clock = clock or time.thread_time
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _lowest_priority()
    while (frame := _read(stdin)) is not None:
        slot, images, shape, champion, champion_seconds = frame
        batch = np.ndarray((images, *shape), np.float32, buffer=memory, offset=slot * SLOT_BYTES)
        start = clock()
        try:
            (probs,) = session.run([contract.PROBABILITIES], {contract.INPUT: batch})
            reply: Any = Window.compared(champion, probs, champion_seconds, clock() - start)
        except Exception as err:  # onnxruntime raises its own untyped errors
            reply = f"{type(err).__name__}: {err}"
        del batch
        stdout.write(_frame(reply))
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
