"""Running inference off the event loop, with dynamic batching.

An ``Engine`` belongs to one loaded model. Concurrent requests are gathered into one
``session.run`` of at most ``max_batch_size`` images, waiting at most ``max_batch_wait_ms``
for company. Each image's result is the same as its unbatched result (onnxruntime computes
every image of a batch independently). A model whose ``session.run`` takes less than
``INLINE_SECONDS`` runs on the event loop itself: the hop to a thread and back (a wake-up and
two GIL hand-overs) would cost more than the run; so does one that runs on one CPU thread in
less than ``ONE_CORE_INLINE_SECONDS`` (the loop would share its core with the thread anyway).
Slower ones (large models, large batches, several operator threads, a GPU's copies) run in the
inference threads while the loop goes on parsing requests; the choice follows a moving average
of the measured run time. A run on the loop holds it, so a request that finds the engine idle
first lets the requests that arrived with it reach the engine (one turn of the loop) and
share its run. When the model is swapped, the old engine drains
its queue before it closes, so requests in flight finish on the old session.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convserve.service.metrics import Metrics
from convserve.service.model import LoadedModel, batch_costs
from convserve.service.settings import Settings

log = logging.getLogger(__name__)

INLINE_SECONDS = 0.001
# A process whose model runs on one core (one onnxruntime thread, on the CPU: a worker of the
# default one-per-core layout) runs it on the event loop up to this long: the loop and an
# inference thread would share that core anyway, so the hop only adds its cost (0.24 ms of CPU
# a request on bench_serve.py's 60 M multiply-add model, 12% of it), and the two threads take
# each other's caches. Up to 8 ms, so that a model of up to 4 ms an image keeps its batches of
# two (WAITING_BATCH) there: the 241 M multiply-add 128x128 model (2.3 ms an image, 4.5 ms a
# batch of two) answered 536 requests/s at concurrency 32 where with a 4 ms limit, its batches
# in the thread, it answered 466 (5 runs each, taking turns; every pair won), at the same p99.
# Longer runs go to the thread: on the loop, each run holds every request whose body is still
# arriving, and such a request waits one round of its worker's other runs for each piece of its
# body (at 20 ms, the 224x224 model's p99 at concurrency 32 read 5x its median, with requests
# past 2 s; with its runs in the thread, 1.2-1.8x and none past 2 s).
ONE_CORE_INLINE_SECONDS = 0.008
# Batching's defaults, chosen per model (plan_batches): the smallest batch whose cost per
# image is within NEAR_BEST of the cheapest measured, up to LARGEST_BATCH; a wait for company
# of at most MAX_WAIT_MS, and never longer than a full batch takes to run. At least
# WAITING_BATCH images of the requests already waiting, with no wait where batches measured no
# cheaper: measured back to back, a run finds the model's weights and onnxruntime's state warm;
# in a worker each run follows other requests' parsing, decoding and answers, and pays its
# fixed cost again. The 60 M multiply-add model of bench_serve.py measured 0.88 ms an image
# alone and 0.83 at two, but served 1,549-1,685 requests/s in batches of up to two against
# 1,262-1,327 in batches of one (2 cores, concurrency 32, taking turns).
LARGEST_BATCH = 32
NEAR_BEST = 1.1
MAX_WAIT_MS = 2.0
WAITING_BATCH = 2


@dataclass(frozen=True)
class BatchPlan:
    size: int  # images per session.run at most
    wait_ms: float  # how long a batch waits for company at most
    costs: dict[int, float]  # seconds per image by batch size, as measured at load
    measured_by: int | None = None  # the process that measured them, where another one did

    def describe(self) -> str:
        measured = ", ".join(f"{b}: {c * 1e3:.3g}" for b, c in self.costs.items())
        by = f" (by worker process {self.measured_by})" if self.measured_by is not None else ""
        how = f"measured ms per image by batch size{by}: {measured}" if self.costs else "as set"
        if self.size > 1 and self.wait_ms == 0:
            batches = f"batches of up to {self.size} images of the requests already waiting"
        else:
            batches = f"batches of up to {self.size} image{'s' if self.size > 1 else ''}, "
            batches += f"waiting at most {self.wait_ms:.3g} ms for company"
        change = "CONVSERVE_MAX_BATCH_SIZE and CONVSERVE_MAX_BATCH_WAIT_MS to change"
        return f"{batches} ({how}; {change})"


def plan_batches(model: LoadedModel, settings: Settings) -> BatchPlan:
    """The batch size and wait from the settings where set, else from the model's cost per
    image measured at each batch size: a small model, whose every run costs a fixed overhead,
    gets the batch that spreads it and waits for company; on a CPU, a model large enough to
    keep a core busy gains little from large batches (they only leave the cache sooner) and
    gets batches of ``WAITING_BATCH`` of the requests already waiting, with no wait. Run it off
    the event loop: it runs the model (at most about ``MEASURE_SECONDS``)."""
    size, wait = settings.max_batch_size, settings.max_batch_wait_ms
    if not settings.batching:
        return BatchPlan(1, 0.0, {})
    if size is not None and wait is not None:
        return BatchPlan(size, wait, {})
    costs, measured_by = shared_costs(model, size or LARGEST_BATCH, settings)
    if size is None:  # the batch worth waiting for, then at least WAITING_BATCH
        cheapest = min(costs.values())
        near_best = min(b for b, cost in costs.items() if cost <= cheapest * NEAR_BEST)
        size = max(near_best, min(WAITING_BATCH, max(costs)))
    else:
        near_best = size
    if wait is None:
        full_batch_ms = costs.get(size, costs[max(costs)]) * size * 1e3
        wait = min(MAX_WAIT_MS, full_batch_ms) if near_best > 1 else 0.0
    return BatchPlan(size, wait, costs, measured_by)


def shared_costs(
    model: LoadedModel, largest: int, settings: Settings
) -> tuple[dict[int, float], int | None]:
    """``batch_costs`` of the model, measured once for all the worker processes of one
    ``convserve serve`` (``settings.peers_dir``): one at a time, under a lock, the first to
    load a model file measures it and the others read its figures (and the process that
    measured them). Measured side by side, the processes would share the cores and each read
    its own noise: on two cores, one read 3.04 ms an image at batch 1 where the other read
    1.88, and chose batches of two where the other chose one."""
    if settings.peers_dir is None or model.source.path is None:
        return batch_costs(model, largest), None
    stat = model.source.path.stat()
    identity = [
        str(model.source.path.resolve()), stat.st_size, stat.st_mtime_ns, largest,
        model.providers, settings.intra_op_threads, settings.inter_op_threads,
    ]  # fmt: skip
    key = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]
    folder = Path(settings.peers_dir) / "batch-costs"  # beside the admin requests, not among
    folder.mkdir(exist_ok=True)
    figures = folder / f"{key}.json"
    with open(folder / "measuring.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            found = json.loads(figures.read_text())
            return {int(b): float(c) for b, c in found["costs"].items()}, int(found["pid"])
        costs = batch_costs(model, largest)
        partial = figures.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"costs": costs, "pid": os.getpid()}))
        partial.replace(figures)
        return costs, None


@dataclass
class _Item:
    images: np.ndarray  # [N, C, H, W]
    outputs: list[str]
    future: asyncio.Future[dict[str, np.ndarray]]
    queued_at: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        executor: ThreadPoolExecutor,
        metrics: Metrics,
        *,
        batching: bool,
        max_batch_size: int,
        max_batch_wait_ms: float,
        one_core: bool = False,
    ) -> None:
        self.model, self.executor, self.metrics = model, executor, metrics
        # a model on one CPU thread stays on the event loop for longer runs: see
        # ONE_CORE_INLINE_SECONDS
        self.inline_up_to = (
            max(INLINE_SECONDS, ONE_CORE_INLINE_SECONDS) if one_core else INLINE_SECONDS
        )
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.max_wait = max_batch_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._carry: _Item | None = None
        self._task = asyncio.create_task(self._loop()) if batching else None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.typical_run = model.run_seconds  # moving average of session.run, seconds
        self.image_seconds = model.run_seconds / 2  # moving average per image (2 at the check)

    async def infer(
        self, images: np.ndarray, outputs: list[str], heavy: Executor | None = None
    ) -> dict[str, np.ndarray]:
        """Outputs for ``images`` ``[N, C, H, W]``, by name. ``heavy``: the executor of a
        request the admission control calls heavy; its images run there, in runs of at
        most the batch size, so that light requests' batches run between them and neither
        the event loop nor the light requests' executor runs them."""
        self._inflight += 1
        self._idle.clear()
        try:
            if heavy is not None:
                return await self._run_in_parts(images, outputs, heavy)
            batched = self.batching and not self._closing
            batched &= images.shape[0] < self.max_batch_size
            if batched and self._inflight == 1 and self._on_loop:
                # A run on the event loop holds it: the requests that came in with this one
                # have not been decoded yet, and would each find the engine idle and run
                # alone. One turn of the loop lets them reach the engine and join this run.
                await asyncio.sleep(0)
            if not batched or self._inflight == 1:  # alone: no company to wait for
                self.metrics.queue_time.observe(0.0)
                return await self._run(images, outputs)
            future: asyncio.Future[dict[str, np.ndarray]] = (
                asyncio.get_running_loop().create_future()
            )
            await self._queue.put(_Item(images, outputs, future))
            return await future
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _run_in_parts(
        self, images: np.ndarray, outputs: list[str], executor: Executor
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        step = max(1, self.max_batch_size)
        parts = []
        for i in range(0, images.shape[0], step):
            part = images[i : i + step]
            result, elapsed = await loop.run_in_executor(executor, self._timed_run, part, outputs)
            parts.append(result)
            self.metrics.inference_time.observe(elapsed)
            self.metrics.batch_size.observe(part.shape[0])
            self.metrics.images.inc(part.shape[0])
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    @property
    def _on_loop(self) -> bool:
        """Whether a typical run goes on the event loop (its moving average is short enough)."""
        return self.typical_run < self.inline_up_to

    async def _run(self, images: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        # A batch larger than the batcher makes (an occlusion map's copies) is not typical:
        # it runs in a thread and leaves the typical run time alone.
        typical = images.shape[0] <= self.max_batch_size
        if typical and self._on_loop:
            result, elapsed = self._timed_run(images, outputs)
        else:
            loop = asyncio.get_running_loop()
            result, elapsed = await loop.run_in_executor(
                self.executor, self._timed_run, images, outputs
            )
        if typical:
            self.typical_run = 0.9 * self.typical_run + 0.1 * elapsed
        self.image_seconds = 0.9 * self.image_seconds + 0.1 * elapsed / images.shape[0]
        self.metrics.inference_time.observe(elapsed)
        self.metrics.batch_size.observe(images.shape[0])
        self.metrics.images.inc(images.shape[0])
        return result

    def _timed_run(
        self, images: np.ndarray, outputs: list[str]
    ) -> tuple[dict[str, np.ndarray], float]:
        """The run and how long it took, timed where it runs: in a thread, the wait for the
        thread and for the event loop to take the result back is not the model's time. Timed
        from the loop, a run in the thread read several times its length under load (a
        queue of requests is parsed meanwhile), and a model that belongs on the loop stayed
        in the thread for good."""
        start = time.perf_counter()
        result = self.model.run(images, outputs)
        return result, time.perf_counter() - start

    async def _next_batch(self) -> list[_Item] | None:
        first = self._carry or await self._queue.get()
        self._carry = None
        if first is None:
            return None
        items, count = [first], first.images.shape[0]
        deadline = time.perf_counter() + self.max_wait
        while count < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                # Wait for company only while other requests are on their way (decoding):
                # a lone request never pays the batching delay.
                if remaining <= 0 or self._inflight <= len(items):
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                self._queue.put_nowait(None)  # close after this batch
                break
            if count + item.images.shape[0] > self.max_batch_size:
                self._carry = item
                break
            items.append(item)
            count += item.images.shape[0]
        return items

    async def _loop(self) -> None:
        while (items := await self._next_batch()) is not None:
            now = time.perf_counter()
            for item in items:
                self.metrics.queue_time.observe(now - item.queued_at)
            try:
                # Inside the try: whatever fails here reaches every waiter, never the loop.
                outputs = sorted(
                    {o for item in items for o in item.outputs}, key=self._output_order
                )
                batch = (
                    np.concatenate([item.images for item in items])
                    if len(items) > 1
                    else items[0].images
                )
                result = await self._run(batch, outputs)
            except Exception as err:  # every waiting request hears of it
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            start = 0
            for item in items:
                n = item.images.shape[0]
                if not item.future.done():
                    item.future.set_result({k: result[k][start : start + n] for k in item.outputs})
                start += n

    def _output_order(self, name: str) -> int:
        names = self.model.output_names
        if name not in names:
            raise ValueError(f"unknown output {name!r}; the model has {', '.join(names)}")
        return names.index(name)

    async def close(self) -> None:
        """Finish every request already submitted, then stop; late callers run unbatched."""
        self._closing = True
        await self._idle.wait()
        if self._task is not None:
            await self._queue.put(None)
            await self._task
