"""One served model and its hot reload: follow a registry alias without downtime.

A new version is loaded, warmed up and self-checked in a worker thread, then swapped in
atomically; the old engine drains its in-flight requests before it closes. A version that
fails its checks is refused for good (until ``/admin/reload?force=true``), logged and
counted; one that could not be fetched (registry or artifact store down) is tried again with
backoff. Either way the old one keeps serving.

The served set of models, and the polling, the memory budget and the passing on of admin
requests between worker processes, are ``catalog.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from convserve.logs import warn_on_change
from convserve.processes import give_back_freed_memory
from convserve.redact import redact
from convserve.service.engine import BatchPlan, Engine, plan_batches
from convserve.service.metrics import Metrics
from convserve.service.model import (
    LoadedModel,
    Source,
    TransientLoadError,
    download,
    open_model,
    parse_uri,
    resolve,
)
from convserve.service.sessions import ModelLoadError
from convserve.service.settings import Settings

log = logging.getLogger(__name__)

UNRESOLVED = "cannot resolve"  # how a failed alias lookup's error begins
MAX_BACKOFF = 300.0  # seconds between tries of a version that could not be fetched
# A version the registry's listing shows still served is looked up again (its tags: metrics,
# the promotion's reason) at most this often
RESOLVE_SECONDS = 60.0


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


def new_executor() -> ThreadPoolExecutor:
    """The threads that load models and run unbatched requests: session.run releases the
    GIL, so a few threads let them overlap."""
    threads = max(2, os.cpu_count() or 2)
    return ThreadPoolExecutor(threads, thread_name_prefix="convserve-infer")


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        source: Source | None = None,
        executor: ThreadPoolExecutor | None = None,
        load_lock: threading.Lock | None = None,
    ) -> None:
        """``source``: the model to serve (default: ``settings.model_uri``); ``executor`` and
        ``load_lock`` are shared by the models of one process (``catalog.Catalog``): loads
        run one at a time, so that each one's memory is measured alone."""
        self.settings, self.metrics = settings, metrics
        self.source = source or parse_uri(settings.model_uri)
        self._owns_executor = executor is None
        self.executor = executor or new_executor()
        self._load_lock = load_lock or threading.Lock()
        self.engine: Engine | None = None
        self.memory_bytes = 0  # resident memory its last load added to the process
        self.load_seconds = 0.0  # how long its last load took
        self.last_used = time.monotonic()
        self.origin = "default"  # how it joined the served set (catalog.py)
        self.resident = True  # wanted in memory; False once unloaded for the memory budget
        self.last_source: Source | None = None  # of the version last served
        self.dataset = ""  # what the version last served was trained on
        self.refused: dict[str, str] = {}  # version -> why it failed its checks
        self.retrying: dict[str, Retry] = {}  # version -> why it could not be fetched
        self.last_error: str | None = None
        self.last_check: float | None = None
        self._resolved_at = -RESOLVE_SECONDS  # time.monotonic() of the last alias lookup
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._client: Any = None

    @property
    def model(self) -> LoadedModel | None:
        return self.engine.model if self.engine is not None else None

    @property
    def follows_alias(self) -> bool:
        return self.source.alias is not None

    @property
    def name(self) -> str:
        return self.source.name

    def client(self) -> Any:
        if self._client is None:
            from convserve.service.registry import registry_for

            self._client = registry_for()
        return self._client

    def _load(self, pinned: Source) -> tuple[LoadedModel, BatchPlan]:
        """Blocking: download (registry) and open the model, and measure its batches and the
        memory it takes; runs in a worker thread."""
        local = (
            download(pinned, self.client(), Path(self.settings.cache_dir))
            if pinned.path is None
            else pinned
        )
        with self._load_lock:
            start, before = time.perf_counter(), rss_bytes()
            model = open_model(local, self.settings)
            plan = plan_batches(model, self.settings)
            # what the checks and the measuring ran on and freed (a closed whole graph's session)
            give_back_freed_memory()
            # at least the file: the weights are in memory whatever else was freed meanwhile
            size = local.path.stat().st_size if local.path is not None else 0
            self.memory_bytes = max(rss_bytes() - before, size)
            self.load_seconds = time.perf_counter() - start
        return model, plan

    def _target(self) -> Source:
        return resolve(self.source, self.client()) if self.follows_alias else self.source

    async def check(self, force: bool = False, listed: str | None = None) -> ReloadOutcome:
        """Serve the version the URI names now, if it differs from the one being served.
        ``listed``: the version the registry's listing of every model's aliases (one search
        for all the models a process follows) shows at the alias; when it is the one served,
        the alias is not looked up again, but every ``RESOLVE_SECONDS`` for the version's
        tags."""
        async with self._lock:
            self.last_check = time.time()
            current = self.model
            if (
                listed is not None
                and not force
                and current is not None
                and str(current.source.version) == listed
                and time.monotonic() - self._resolved_at < RESOLVE_SECONDS
            ):
                return self._unchanged(listed)
            loop = asyncio.get_running_loop()
            try:
                target = await loop.run_in_executor(self.executor, self._target)
            except Exception as err:  # registry down, alias missing: keep serving
                error = redact(f"{UNRESOLVED} {self.source.uri}: {err}")
                warn_on_change(log, error, self.last_error, self.settings.poll_interval)
                self.last_error = error
                return ReloadOutcome(False, self._version(), self.last_error)
            if self.last_error is not None and self.last_error.startswith(UNRESOLVED):
                log.info("%s resolves to version %s now", self.source.uri, target.version)
            self._resolved_at = time.monotonic()
            if current is not None and current.source.version == target.version and not force:
                if target.tags and target.tags != current.source.tags:  # tagged since its load
                    current.source = self.last_source = replace(current.source, tags=target.tags)
                return self._unchanged(target.version)
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
            self.last_error = None
            self.refused.pop(key, None)
            self.retrying.pop(key, None)
            return ReloadOutcome(True, model.source.version, f"serving version {key}")

    def _unchanged(self, version: str | None) -> ReloadOutcome:
        """The registry answered with the version served: what failed before is over."""
        self.last_error = None
        return ReloadOutcome(False, version, "already serving this version")

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
        self.last_source = src
        self.dataset = model.meta.dataset or src.tags.get("convserve.dataset", "")
        self.metrics.serving(
            src.name, str(src.version), src.alias or "", src.run_id or "", ",".join(model.providers)
        )
        self.metrics.model_memory.labels(src.name, src.alias or "").set(self.memory_bytes)
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

    async def unload(self) -> None:
        """Stop serving: requests in flight finish on the engine, new ones find none."""
        async with self._lock:
            old, self.engine = self.engine, None
            if old is None:
                return
            self.metrics.not_serving(self.name, self.source.alias or "")
            log.info("unloaded %s version %s", self.name, old.model.source.version)
            await old.close()

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        if self._owns_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
