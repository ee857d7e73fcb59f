"""Which model is served, and hot reload: follow a registry alias without downtime.

A new version is loaded, warmed up and self-checked in a worker thread, then swapped in
atomically; the old engine drains its in-flight requests before it closes. A version that
fails its checks is refused for good (until ``/admin/reload?force=true``), logged and
counted; one that could not be fetched (registry or artifact store down) is tried again with
backoff. Either way the old one keeps serving.

With several worker processes, each has its own manager and follows the alias on its own.
``/admin/reload`` reaches one of them; it reloads, then writes the request to a file in
``CONVSERVE_PEERS_DIR`` (a folder ``convserve serve`` makes for its workers), which the others
watch every ``PEER_WATCH_SECONDS`` and follow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convserve.redact import redact
from convserve.service.engine import BatchPlan, Engine, plan_batches
from convserve.service.metrics import Metrics
from convserve.service.model import (
    LoadedModel,
    ModelLoadError,
    Source,
    TransientLoadError,
    download,
    open_model,
    parse_uri,
    resolve,
)
from convserve.service.settings import Settings

log = logging.getLogger(__name__)


MAX_BACKOFF = 300.0  # seconds between tries of a version that could not be fetched
PEER_WATCH_SECONDS = 0.25  # how often a worker looks for another worker's reload request


@dataclass
class Retry:
    """A version that could not be fetched: how often, why, and when to try again."""

    attempts: int
    reason: str
    next_at: float


@dataclass
class ReloadOutcome:
    changed: bool
    version: str | None
    message: str


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.source = parse_uri(settings.model_uri)
        # session.run releases the GIL: a few threads let unbatched requests overlap.
        threads = max(2, os.cpu_count() or 2)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="convserve-infer")
        self.engine: Engine | None = None
        self.refused: dict[str, str] = {}  # version -> why it failed its checks
        self.retrying: dict[str, Retry] = {}  # version -> why it could not be fetched
        self.last_error: str | None = None
        self.last_check: float | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        peers = settings.peers_dir
        self._peer_file = Path(peers) / "reload" if peers else None
        self._peer_seen = self._read_peer_file()
        self._client: Any = None

    @property
    def model(self) -> LoadedModel | None:
        return self.engine.model if self.engine is not None else None

    @property
    def follows_alias(self) -> bool:
        return self.source.alias is not None

    def client(self) -> Any:
        if self._client is None:
            from convserve.service.registry import registry_for

            self._client = registry_for()
        return self._client

    def _load(self, pinned: Source) -> tuple[LoadedModel, BatchPlan]:
        """Blocking: download (registry) and open the model, and measure its batches; runs in
        a worker thread."""
        local = (
            download(pinned, self.client(), Path(self.settings.cache_dir))
            if pinned.path is None
            else pinned
        )
        model = open_model(local, self.settings)
        return model, plan_batches(model, self.settings)

    def _target(self) -> Source:
        return resolve(self.source, self.client()) if self.follows_alias else self.source

    async def check(self, force: bool = False) -> ReloadOutcome:
        """Serve the version the URI names now, if it differs from the one being served."""
        async with self._lock:
            self.last_check = time.time()
            loop = asyncio.get_running_loop()
            try:
                target = await loop.run_in_executor(self.executor, self._target)
            except Exception as err:  # registry down, alias missing: keep serving
                self.last_error = redact(f"cannot resolve {self.source.uri}: {err}")
                log.warning(self.last_error)
                return ReloadOutcome(False, self._version(), self.last_error)
            current = self.model
            if current is not None and current.source.version == target.version and not force:
                return ReloadOutcome(False, target.version, "already serving this version")
            key = str(target.version)
            if key in self.refused and not force:
                return ReloadOutcome(
                    False, self._version(), f"version {key} was refused: {self.refused[key]}"
                )
            retry = self.retrying.get(key)
            if retry is not None and not force and time.time() < retry.next_at:
                wait = retry.next_at - time.time()
                return ReloadOutcome(
                    False, self._version(), f"version {key}: next try in {wait:.0f} s"
                )
            try:
                model, plan = await loop.run_in_executor(self.executor, self._load, target)
            except TransientLoadError as err:
                return self._retry_later(key, str(err))
            except (ModelLoadError, ValueError) as err:  # the version itself is bad
                return self._refuse(key, str(err))
            except Exception as err:  # anything else on the way (network, disk) may recover
                return self._retry_later(key, f"{type(err).__name__}: {err}")
            await self._swap(model, plan)
            self.refused.pop(key, None)
            self.retrying.pop(key, None)
            return ReloadOutcome(True, model.source.version, f"serving version {key}")

    def _refuse(self, version: str, reason: str) -> ReloadOutcome:
        self.refused[version] = reason = redact(reason)
        self.last_error = f"version {version} refused: {reason}"
        self.metrics.refused.inc()
        log.error(self.last_error)
        return ReloadOutcome(False, self._version(), self.last_error)

    def _retry_later(self, version: str, reason: str) -> ReloadOutcome:
        """Back off: the poll interval, doubled at each failure, at most ``MAX_BACKOFF``."""
        reason = redact(reason)
        attempts = self.retrying[version].attempts + 1 if version in self.retrying else 1
        delay = min(self.settings.poll_interval * 2 ** (attempts - 1), MAX_BACKOFF)
        self.retrying[version] = Retry(attempts, reason, time.time() + delay)
        self.last_error = f"version {version} not loaded yet (try {attempts}): {reason}"
        self.metrics.load_failures.inc()
        log.warning("%s; trying again in %.0f s", self.last_error, delay)
        return ReloadOutcome(False, self._version(), self.last_error)

    def problems(self) -> dict[str, str]:
        """Versions not served and why: refused for good, or to be tried again."""
        out = {v: f"refused: {reason}" for v, reason in self.refused.items()}
        for v, retry in self.retrying.items():
            out[v] = f"not fetched after {retry.attempts} tries, trying again: {retry.reason}"
        return out

    def _version(self) -> str | None:
        return self.model.source.version if self.model is not None else None

    async def _swap(self, model: LoadedModel, plan: BatchPlan) -> None:
        old = self.engine
        self.engine = Engine(
            model,
            self.executor,
            self.metrics,
            batching=self.settings.batching,
            max_batch_size=plan.size,
            max_batch_wait_ms=plan.wait_ms,
            one_core=self.settings.intra_op_threads == 1
            and model.providers == ["CPUExecutionProvider"],
        )
        self.metrics.reloads.inc()
        src = model.source
        self.metrics.serving(
            src.name, str(src.version), src.alias or "", src.run_id or "", ",".join(model.providers)
        )
        was = f" (was version {old.model.source.version})" if old is not None else ""
        log.info(
            "serving %s version %s%s on %s", src.name, src.version, was, ",".join(model.providers)
        )
        if self.settings.batching:
            log.info("%s version %s: %s", src.name, src.version, plan.describe())
        if old is not None:  # drains in the background; kept referenced until done
            task = asyncio.create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def poll(self) -> None:
        """Follow the alias until cancelled; also retries while no model is loaded, and
        follows the reload requests other workers pass on."""
        next_poll = time.monotonic() + self.settings.poll_interval
        while True:
            remaining = max(0.0, next_poll - time.monotonic())
            watching = self._peer_file is not None
            await asyncio.sleep(min(remaining, PEER_WATCH_SECONDS) if watching else remaining)
            request = self._peer_request()
            if request is not None:
                await self.check(force=request)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.settings.poll_interval
                if self.follows_alias or self.model is None:
                    await self.check()

    async def reload(self, force: bool) -> ReloadOutcome:
        """``/admin/reload``: check now, and have every other worker process do the same."""
        outcome = await self.check(force=force)
        if self._peer_file is not None:
            temporary = self._peer_file.with_name(f".{os.getpid()}.tmp")
            temporary.write_text(f"{os.getpid()} {time.time_ns()} {int(force)}")
            request = f"{os.getpid()} {time.time_ns()} {int(force)}"
            temporary.write_text(request)
            temporary.replace(self._peer_file)  # atomic: a reader sees all of it or none
            self._peer_seen = request  # not to be followed again by this worker
        return outcome

    def _read_peer_file(self) -> str | None:
        """The last reload request passed on, if there is a folder for them and one was."""
        try:
            return self._peer_file.read_text() if self._peer_file is not None else None
        except OSError:  # none yet
            return None

    def _peer_request(self) -> bool | None:
        """Another worker's reload request not yet followed: its ``force``; else None."""
        request = self._read_peer_file()
        if request is None or request == self._peer_seen:
            return None
        self._peer_seen = request
        return request.endswith(" 1")

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
