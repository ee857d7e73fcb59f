"""The served set of models: the default one (``CONVSERVE_MODEL_URI``, answered by bare
``/predict``) and those ``CONVSERVE_MODELS`` names, each followed and hot-reloaded on its own
by a ``ModelManager``; the memory budget; and the admin requests (reload, load, unload) passed
on between worker processes.

A name or pattern in ``CONVSERVE_MODELS`` is looked for in the registry at every poll: each
registered model it matches that has the default model's alias (``champion``) joins the set
and is loaded in the background, so a model registered and promoted while the server runs is
served without a restart; one whose alias is removed leaves it. As Triton's model repository
API does, an admin loads a model by name (its alias, or a version) and unloads it; an
unloaded model stays out of the set until it is loaded again.

With ``CONVSERVE_MODEL_MEMORY_MB`` set, the models a worker process holds stay within it: the
memory each takes is measured when it loads (the process's resident memory before and after,
loads one at a time), and before a load, or after one that went over, the least recently used
model is unloaded, the default one never. An unloaded model stays in the set: its next
request starts its load and is answered 503 with ``Retry-After``, never held while it loads.

With several worker processes (``convserve serve``), each holds its own set and budget. An
admin request reaches one of them; it acts, then writes the request as a file in
``CONVSERVE_PEERS_DIR``, which the others watch every ``PEER_WATCH_SECONDS`` and follow (a
worker that starts later follows the loads and unloads written before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import threading
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import Response

from convserve.logs import warn_on_change
from convserve.redact import redact
from convserve.service import rollout
from convserve.service.engine import Engine
from convserve.service.manager import ModelManager, ReloadOutcome, new_executor
from convserve.service.metrics import Metrics
from convserve.service.model import Source, parse_uri
from convserve.service.rollout import CHALLENGER, Criteria, Live, LiveDecision, Shares
from convserve.service.settings import Settings
from convserve.service.shadow import Item, Shadows

log = logging.getLogger(__name__)

MiB = 1 << 20
PEER_WATCH_SECONDS = 0.25  # how often a worker looks for another worker's admin request
NO_MODEL = (
    "no model is loaded yet ({uri}). Train and register one: `convserve train`, then "
    "`convserve export --run-id <run id>` (it registers and promotes the champion), or set "
    "CONVSERVE_MODEL_URI to an exported .onnx file.{error}"
)


class NotServed(Exception):
    """A model that cannot answer now: ``status`` 404 (not in the served set), 400 (an admin
    request that cannot be done) or 503 (loading or failing; ``retry_after`` seconds)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, redact(message), retry_after


def _metrics(tags: dict[str, str]) -> dict[str, float]:
    """The run's metrics a registered version carries as ``metric.<name>`` tags."""
    out = {}
    for key, value in tags.items():
        if key.startswith("metric."):
            with contextlib.suppress(ValueError):
                out[key.removeprefix("metric.")] = float(value)
    return out


def _comparable(champion: Engine, challenger: Engine) -> bool:
    """Whether a challenger takes the champion's input and names the same classes."""
    a, b = champion.model, challenger.model
    return (a.channels, a.height, a.width, a.labels) == (b.channels, b.height, b.width, b.labels)


class _ShadowCopy(BackgroundTask):
    """A shadowed request's images handed to the challenger's process, on the event loop
    once the response's body is sent: a ``BackgroundTask`` without the inspection of a
    function that each one makes as it is built."""

    def __init__(self, shadows: Shadows, source: Source, live: Live, item: Item) -> None:
        self.shadows, self.source, self.live, self.item = shadows, source, live, item

    async def __call__(self) -> None:
        self.shadows.add(self.source, self.live, self.item)


def _listed(listing: dict[str, dict[str, str]] | None, manager: ModelManager) -> str | None:
    """The version the registry's listing shows at the alias ``manager`` follows."""
    alias = manager.source.alias
    if listing is None or alias is None:
        return None
    return listing.get(manager.name, {}).get(alias)


def parse_models(models: str) -> tuple[list[str], list[Source]]:
    """``CONVSERVE_MODELS``: the name patterns, and the models named by URI or file."""
    patterns, sources = [], []
    for entry in (e.strip() for e in models.split(",")):
        if entry.startswith("models:/") or entry.endswith(".onnx"):
            sources.append(parse_uri(entry))
        elif entry:
            patterns.append(entry)
    return patterns, sources


class Catalog:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.executor = new_executor()
        self._load_lock = threading.Lock()
        self.patterns, sources = parse_models(settings.models)
        self.models: dict[str, ModelManager] = {}
        self.default = self._add(parse_uri(settings.model_uri), "default")
        for source in sources:
            if source.name in self.models:
                raise ValueError(
                    f"CONVSERVE_MODELS names {source.uri!r}, but the name {source.name!r} is "
                    f"served already ({self.models[source.name].source.uri}): one model a name"
                )
            self._add(source, "configured")
        self.unloaded: set[str] = set()  # by an admin: out of the set until loaded again
        self.discovery_error: str | None = None
        self._loads: dict[str, asyncio.Task[ReloadOutcome]] = {}
        self._peers = Path(settings.peers_dir) if settings.peers_dir else None
        self._peer_seen: set[str] = set()
        # challengers (rollout.py): per model, the shares an admin set, the challenger's
        # manager, and what it showed, per challenger version
        self.shares: dict[str, Shares] = {}
        self._default_shares = Shares(settings.shadow_share, settings.canary_share)
        self.challengers: dict[str, ModelManager] = {}
        self.live: dict[tuple[str, str], Live] = {}
        # shadow runs, in a process per challenger (shadow.py)
        self.shadows = Shadows(settings.device)
        self._next_log = time.monotonic() + settings.rollout_log_seconds

    def _add(self, source: Source, origin: str) -> ModelManager:
        manager = ModelManager(self.settings, self.metrics, source, self.executor, self._load_lock)
        manager.origin = origin
        self.models[source.name] = manager
        return manager

    @property
    def alias(self) -> str | None:
        """The alias a name in ``CONVSERVE_MODELS`` is followed at: the default model's."""
        return self.default.source.alias

    @property
    def budget(self) -> int:
        return self.settings.model_memory_mb * MiB

    def memory_in_use(self) -> int:
        managers = [*self.models.values(), *self.challengers.values()]
        return sum(m.memory_bytes for m in managers if m.engine is not None)

    # -- answering ------------------------------------------------------------------------

    def engine(self, name: str | None = None) -> Engine:
        """The engine serving ``name`` (the default model when None). A model of the set that
        is not in memory starts loading: ``NotServed`` 503 with ``Retry-After`` meanwhile."""
        manager = self.default if name is None else self.models.get(name)
        if manager is None:
            raise NotServed(404, self._unknown(str(name)))
        manager.last_used = time.monotonic()
        engine = manager.engine
        if engine is not None:
            return engine
        if not manager.resident:  # unloaded for the budget: back on its first request
            self.load_soon(manager)
        retry_after = self._retry_after(manager)
        raise NotServed(503, self._why_not(manager, retry_after), retry_after)

    def route(self, name: str | None = None) -> tuple[Engine, Engine | None]:
        """The engine that answers a request for ``name``, and the challenger's to shadow it
        with (None: no shadow): the champion's, or with the canary's share the challenger's."""
        engine = self.engine(name)
        key = engine.model.source.name
        challenger = self.challengers.get(key)
        if challenger is None or challenger.engine is None:
            return engine, None
        other = challenger.engine
        if not _comparable(engine, other):
            return engine, None
        shares = self.shares_for(key)
        draw = random.random()
        if draw < shares.canary:
            self._live(other).count(canary=1)
            return other, None
        return engine, other if draw < shares.canary + shares.shadow else None

    def shadow_after(
        self,
        response: Response,
        champion: Engine,
        challenger: Engine | None,
        batch: Any,
        probs: Any,
    ) -> Response:
        """``response``; with a ``challenger`` (``route``), one that runs ``batch`` on it
        once its body is sent, off the response path: the images go to the challenger's own
        process at the lowest CPU priority (a background task on the event loop copies them
        into its memory), batched with the requests of the next ``shadow.FLUSH_SECONDS``
        (shadow.py), and the comparison with the champion's ``probs`` is counted."""
        if challenger is None or probs is None:
            return response
        source, live = challenger.model.source, self._live(challenger)
        if self.shadows.behind(source):  # skipped now, at the least cost to the answer
            live.count(skipped=len(batch))
            return response
        item = Item(batch, probs, champion.image_seconds)
        response.background = _ShadowCopy(self.shadows, source, live, item)
        return response

    def _live(self, challenger: Engine) -> Live:
        source = challenger.model.source
        key = (source.name, str(source.version))
        if key not in self.live:
            self.live[key] = Live(run_id=source.run_id or "")
        return self.live[key]

    def shares_for(self, name: str) -> Shares:
        return self.shares.get(name) or self._default_shares

    def _unknown(self, name: str) -> str:
        served = ", ".join(map(repr, sorted(self.models)))
        if name in self.unloaded:
            return (
                f"model {name!r} was unloaded by an admin; POST /v2/repository/models/{name}/load "
                f"serves it again (served: {served})"
            )
        return f"unknown model {name!r}; this server serves {served} (GET /v1/models)"

    def _why_not(self, manager: ModelManager, retry_after: int) -> str:
        if manager.name in self._loads or (manager.resident and manager.last_error is None):
            return f"model {manager.name!r} is loading; try again in {retry_after} s"
        if manager is self.default:
            error = f" Last error: {manager.last_error}" if manager.last_error else ""
            return NO_MODEL.format(uri=manager.source.uri, error=error)
        return f"model {manager.name!r} is not loaded: {manager.last_error}"

    def _retry_after(self, manager: ModelManager) -> int:
        retries = [r.next_at - time.time() for r in manager.retrying.values()]
        if manager.name in self._loads or not retries:
            return max(1, math.ceil(manager.load_seconds or 1.0))
        return max(1, math.ceil(min(retries)))

    def state(self, manager: ModelManager) -> tuple[str, str | None]:
        """Triton's model states: READY, LOADING, UNAVAILABLE (with why), and UNLOADED for
        one that loads on its first request."""
        if manager.engine is not None:
            return "READY", None
        if manager.name in self._loads:
            return "LOADING", None
        if not manager.resident:
            return "UNLOADED", (
                "unloaded to keep the models within CONVSERVE_MODEL_MEMORY_MB"
                if manager.last_source is not None
                else "not loaded yet"
            ) + "; its next request loads it"
        if manager.last_error:
            return "UNAVAILABLE", manager.last_error
        return "LOADING", None

    def describe(self) -> list[dict[str, Any]]:
        """Every model of the set, the default one first, then the ones an admin unloaded."""
        out = []
        for manager in sorted(self.models.values(), key=lambda m: (m is not self.default, m.name)):
            state, reason = self.state(manager)
            model = manager.model
            source = model.source if model is not None else manager.last_source
            tags = source.tags if source is not None else {}
            out.append(
                {
                    "name": manager.name,
                    "default": manager is self.default,
                    "state": state,
                    "reason": reason,
                    "version": source.version if source is not None else None,
                    "alias": manager.source.alias,
                    "uri": redact(manager.source.uri),
                    "origin": manager.origin,
                    "dataset": manager.dataset or tags.get("convserve.dataset") or None,
                    "metrics": _metrics(tags),
                    "promotion": tags.get("convserve.promotion_reason") or None,
                    "labels": len(model.labels) if model is not None else None,
                    "memory_bytes": manager.memory_bytes if model is not None else 0,
                    "load_seconds": round(manager.load_seconds, 3)
                    if manager.load_seconds
                    else None,
                    "idle_seconds": round(time.monotonic() - manager.last_used, 1),
                    "not_served": manager.problems(),
                    "rollout": self.rollout(manager.name),
                }
            )
        for name in sorted(self.unloaded - set(self.models)):
            out.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded by an admin"})
        return out

    # -- loading and the budget -----------------------------------------------------------

    def load_soon(self, manager: ModelManager) -> asyncio.Task[ReloadOutcome]:
        """Load ``manager``'s model in the background (once, however often it is asked)."""
        name = manager.name
        task = self._loads.get(name)
        if task is None:
            task = asyncio.create_task(self._load(manager))
            self._loads[name] = task
            task.add_done_callback(lambda _: self._loads.pop(name, None))
        return task

    async def _load(self, manager: ModelManager, force: bool = False) -> ReloadOutcome:
        manager.resident = True
        await self._make_room(manager, manager.memory_bytes or self._typical_memory())
        outcome = await manager.check(force=force)
        await self._make_room(manager, 0)  # its measured memory may have gone over
        return outcome

    def _typical_memory(self) -> int:
        known = [m.memory_bytes for m in self.models.values() if m.memory_bytes]
        return sum(known) // len(known) if known else 0

    async def _make_room(self, keep: ModelManager | None, need: int) -> None:
        """Unload the least recently used models (not ``keep``, not the default one) until
        ``need`` more bytes fit in the budget."""
        if not self.budget:
            return
        loaded = [
            m
            for m in self.models.values()
            if m.engine is not None and m is not keep and m is not self.default
        ]
        for victim in sorted(loaded, key=lambda m: m.last_used):
            if self.memory_in_use() + need <= self.budget:
                return
            victim.resident = False
            log.info(
                "unloading %s (%.1f MiB, least recently used) to keep the models within "
                "CONVSERVE_MODEL_MEMORY_MB=%d; its next request loads it again",
                victim.name,
                victim.memory_bytes / MiB,
                self.settings.model_memory_mb,
            )
            self.metrics.evictions.inc()
            await victim.unload()

    def _has_room(self) -> bool:
        return not self.budget or self.memory_in_use() + self._typical_memory() <= self.budget

    # -- following the registry -----------------------------------------------------------

    async def start(self) -> None:
        """Load the default model, follow the admin requests written before this process
        started, find the registry's models, and load the others in the background."""
        await self.default.check()
        await self._follow_peers(starting=True)
        await self._discover(await self._listing())
        for manager in list(self.models.values()):
            if manager.engine is None and manager is not self.default and manager.resident:
                self.load_soon(manager)

    async def _listing(self) -> dict[str, dict[str, str]] | None:
        """The registry's models and their aliases (one search), when the served set follows
        the registry for new models or challengers; None when it need not or cannot."""
        challengers = any(self.shares_for(n).active for n in self.models)
        if self.alias is None or not (self.patterns or challengers):
            return None
        loop = asyncio.get_running_loop()
        try:
            listing = await loop.run_in_executor(self.executor, self.default.client().aliases)
        except Exception as err:  # registry down: serve what is loaded, try again next poll
            error = redact(f"cannot list the registry's models: {err}")
            warn_on_change(log, error, self.discovery_error, self.settings.poll_interval)
            self.discovery_error = error
            return None
        if self.discovery_error is not None:
            log.info("the registry's models are listed again")
        self.discovery_error = None
        return listing

    async def _discover(self, listing: dict[str, dict[str, str]] | None) -> None:
        """Add the registry's models that ``CONVSERVE_MODELS`` names and that have the alias;
        drop the discovered ones that lost it."""
        alias = self.alias
        if not self.patterns or alias is None or listing is None:
            return
        found = {name: aliases[alias] for name, aliases in listing.items() if alias in aliases}
        for name in sorted(found):
            if name in self.models or name in self.unloaded:
                continue
            if any(fnmatchcase(name, pattern) for pattern in self.patterns):
                manager = self._add(Source(f"models:/{name}@{alias}", name, alias=alias), "found")
                log.info("found %s in the registry (%s: version %s)", name, alias, found[name])
                if self._has_room():
                    self.load_soon(manager)
                else:  # loaded on its first request
                    manager.resident = False
        for name, manager in list(self.models.items()):
            if manager.origin == "found" and name not in found:
                log.info("%s has no %s any more: no longer served", name, alias)
                await self._drop(name)

    async def poll(self) -> None:
        """Follow the registry until cancelled: new models, new versions of each model in
        memory, and retries of those that failed; and the admin requests of other workers."""
        next_poll = time.monotonic() + self.settings.poll_interval
        while True:
            remaining = max(0.0, next_poll - time.monotonic())
            await asyncio.sleep(min(remaining, PEER_WATCH_SECONDS) if self._peers else remaining)
            await self._follow_peers()
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + self.settings.poll_interval
            listing = await self._listing()
            await self._discover(listing)
            for manager in list(self.models.values()):
                busy = manager.name in self._loads
                if manager.resident and not busy and (manager.follows_alias or not manager.model):
                    await manager.check(listed=_listed(listing, manager))
            await self._follow_challengers(listing)
            if time.monotonic() >= self._next_log:
                self._next_log = time.monotonic() + self.settings.rollout_log_seconds
                await self._log_live()
            # a new version may take more: the most recently used model stays in any case
            loaded = [m for m in self.models.values() if m.engine is not None]
            await self._make_room(max(loaded, key=lambda m: m.last_used, default=None), 0)

    # -- challengers -------------------------------------------------------------------

    async def _follow_challengers(self, listing: dict[str, dict[str, str]] | None) -> None:
        """Load the challenger of every registered model with a share, follow its alias,
        and drop those no longer wanted or gone from the registry (``listing``: None when
        the registry could not be read, or nothing has a share)."""
        wanted = {
            name
            for name, m in self.models.items()
            if m.source.alias is not None and self.shares_for(name).active
        }
        if wanted and listing is None:  # registry down: keep what is loaded
            return
        found = {n for n, aliases in (listing or {}).items() if CHALLENGER in aliases}
        for name in list(self.challengers):
            if name not in wanted or name not in found:
                gone = self.challengers.pop(name)
                await self.shadows.retire(name)
                await gone.unload()
                await gone.close()
        for name in sorted(wanted & found):
            manager = self.challengers.get(name)  # type: ignore[assignment]
            if manager is None:
                source = Source(f"models:/{name}@{CHALLENGER}", name, alias=CHALLENGER)
                manager = ModelManager(
                    self.settings, self.metrics, source, self.executor, self._load_lock
                )
                manager.origin = CHALLENGER
                self.challengers[name] = manager
            await manager.check(listed=_listed(listing, manager))
            champion, challenger = self.models[name].engine, manager.engine
            shadowed = self.shares_for(name).shadow > 0
            if shadowed and champion and challenger and _comparable(champion, challenger):
                self.shadows.start(challenger.model.source, self._live(challenger))

    async def _log_live(self) -> None:
        """What each challenger showed since the last log, as one window on its run."""
        if not self.live:
            return
        client = self.default.client()
        loop = asyncio.get_running_loop()
        for key, live in list(self.live.items()):
            window = live.take()
            if window.counted:
                step = time.time_ns() // 1000  # unique per window across processes
                try:
                    await loop.run_in_executor(
                        self.executor, client.log_metrics, live.run_id, window.metrics(), step
                    )
                except Exception as err:  # kept for the next log
                    live.give_back(window)
                    log.warning("cannot log %s's live metrics: %s", key[0], redact(str(err)))
            model = self.challengers[key[0]].model if key[0] in self.challengers else None
            current = model is not None and str(model.source.version) == key[1]
            if current or live.pending.counted or self.shadows.under_way(*key):
                continue
            del self.live[key]  # an earlier challenger's, logged

    async def log_live_now(self) -> None:
        """Log what the challengers showed in this process now (the shadows under way
        first)."""
        await self.shadows.done()
        await self._log_live()

    async def promote(self, name: str, criteria: Criteria) -> LiveDecision:
        """``rollout.promote`` on ``name``'s challenger, with this process's windows logged
        first; a promotion is then served by every worker process."""
        served = self.models.get(name)
        if served is None or served.source.alias is None:
            raise NotServed(404, f"{name!r} is not a registered model this server follows")
        await self.log_live_now()
        loop = asyncio.get_running_loop()
        registry = self.default.client()
        try:
            decision = await loop.run_in_executor(
                self.executor, rollout.promote, registry, name, criteria
            )
        except LookupError as err:
            raise NotServed(404, str(err)) from None
        except Exception as err:  # the registry could not be read or written: try later
            retry = max(1, math.ceil(self.settings.poll_interval))
            raise NotServed(503, f"the registry cannot be read: {err}", retry) from None
        if decision.promoted:
            await self.reload(name, force=False)
        return decision

    async def set_rollout(self, name: str, shares: Shares) -> None:
        """Shadow and canary shares for ``name``'s challenger, in every worker process."""
        await self._set_rollout(name, shares)
        self._tell_peers(
            {"action": "rollout", "model": name, "shadow": shares.shadow, "canary": shares.canary}
        )

    async def _set_rollout(self, name: str, shares: Shares) -> None:
        manager = self._manager(name)
        if manager.source.alias is None:
            raise NotServed(
                400, f"{name!r} is not a registered model followed at an alias: no challenger"
            )
        self.shares[name] = shares
        await self._follow_challengers(await self._listing())

    def rollout(self, name: str) -> dict[str, Any] | None:
        """A model's shares, its challenger and what it showed in this process."""
        shares = self.shares_for(name)
        challenger = self.challengers.get(name)
        if challenger is None and not shares.active:
            return None
        out: dict[str, Any] = {"shadow": shares.shadow, "canary": shares.canary}
        if challenger is None:
            out["state"] = "no challenger version in the registry"
            return out
        state, reason = self.state(challenger)
        model = challenger.model
        out |= {"version": model.source.version if model else None, "state": state}
        if reason:
            out["reason"] = reason
        champion, other = self.models[name].engine, challenger.engine
        if champion is not None and other is not None and not _comparable(champion, other):
            reason = "its input or classes differ from the champion's: not used"
            out |= {"state": "UNAVAILABLE", "reason": reason}
        if model is not None:
            live = self.live.get((name, str(model.source.version)))
            out["live"] = live.snapshot() if live is not None else {}
            runner = self.shadows.runner(model.source)
            if runner is not None:
                out["shadow_process"] = runner.state
        return out

    async def _drop(self, name: str) -> None:
        manager = self.models.pop(name)
        task = self._loads.get(name)
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        await manager.unload()
        await manager.close()

    # -- admin requests -------------------------------------------------------------------

    def _manager(self, name: str | None) -> ModelManager:
        manager = self.default if name is None else self.models.get(name)
        if manager is None:
            raise NotServed(404, self._unknown(str(name)))
        return manager

    async def reload(self, name: str | None, force: bool) -> ReloadOutcome:
        """``/admin/reload``: check the model now (every model in memory when ``name`` is
        None; the outcome is the default model's), and have every other worker do the same."""
        outcome = await self._reload(name, force)
        self._tell_peers({"action": "reload", "model": name, "force": force})
        return outcome

    async def _reload(self, name: str | None, force: bool) -> ReloadOutcome:
        manager = self._manager(name)
        if name is None:
            for other in list(self.models.values()):
                if other is not self.default and other.resident:
                    await other.check(force=force)
        return await manager.check(force=force)

    async def load(self, name: str, version: str | None = None) -> ReloadOutcome:
        """Triton's repository load: serve ``name`` now, at ``version``, else at the alias;
        ``NotServed`` 400 when it cannot be loaded (nothing is added then)."""
        outcome = await self._load_named(name, version)
        self._tell_peers({"action": "load", "model": name, "version": version})
        return outcome

    async def _load_named(self, name: str, version: str | None) -> ReloadOutcome:
        manager = self.models.get(name)
        if version is not None:
            source = Source(f"models:/{name}/{version}", name, version=version)
        elif manager is not None:
            source = manager.source
        elif self.alias is not None:
            source = Source(f"models:/{name}@{self.alias}", name, alias=self.alias)
        else:
            raise NotServed(
                400,
                f"cannot load {name!r} by name: the default model ({self.default.source.uri}) "
                "is not followed at a registry alias; give a version",
            )
        if manager is self.default and source != manager.source:
            raise NotServed(400, f"{name!r} is the default model: it follows CONVSERVE_MODEL_URI")
        existed = manager is not None and source == manager.source
        if manager is not None and not existed:
            await self._drop(name)
        if not existed:
            manager = self._add(source, "loaded")
        assert manager is not None
        self.unloaded.discard(name)
        outcome = await self._load(manager)
        if manager.engine is None:
            if not existed:
                await self._drop(name)
            raise NotServed(400, f"failed to load {name!r}: {outcome.message}")
        return outcome

    async def unload(self, name: str) -> None:
        """Triton's repository unload: out of the set until loaded again; requests in flight
        finish."""
        await self._unload(name)
        self._tell_peers({"action": "unload", "model": name})

    async def _unload(self, name: str) -> None:
        manager = self._manager(name)
        if manager is self.default:
            raise NotServed(
                400,
                f"{name!r} is the default model (CONVSERVE_MODEL_URI): it answers bare /predict "
                "and /readyz and is not unloaded",
            )
        # out of the set before the drop's awaits: a poll's discovery running meanwhile must
        # not find the model missing, and not yet unloaded, and load it again
        self.unloaded.add(name)
        await self._drop(name)

    def _tell_peers(self, request: dict[str, Any]) -> None:
        if self._peers is None:
            return
        name = f"{time.time_ns():020d}-{os.getpid()}.json"
        temporary = self._peers / f".{name}.tmp"
        temporary.write_text(json.dumps(request))
        temporary.replace(self._peers / name)  # atomic: a reader sees all of it or none
        self._peer_seen.add(name)

    async def _follow_peers(self, starting: bool = False) -> None:
        """The other workers' admin requests not yet followed, in order; at start-up, the
        loads and unloads among them (the reloads are past)."""
        if self._peers is None:
            return
        try:
            names = sorted(n for n in os.listdir(self._peers) if n.endswith(".json"))
        except OSError:
            return
        for name in names:
            if name in self._peer_seen:
                continue
            self._peer_seen.add(name)
            try:
                request = json.loads((self._peers / name).read_text())
                await self._follow(request, starting)
            except (OSError, ValueError, KeyError, NotServed) as err:
                log.warning("another worker's admin request %s not followed: %s", name, err)

    async def _follow(self, request: dict[str, Any], starting: bool) -> None:
        action, model = request["action"], request.get("model")
        if action == "reload" and not starting:
            await self._reload(model, bool(request.get("force")))
        elif action == "load" and model is not None:
            await self._load_named(model, request.get("version"))
        elif action == "unload" and model in self.models:
            await self._unload(model)
        elif action == "rollout" and model in self.models:
            shares = Shares(float(request["shadow"]), float(request["canary"]))
            await self._set_rollout(model, shares)

    async def close(self) -> None:
        for task in list(self._loads.values()):
            task.cancel()
        await self.shadows.close()  # their answers first: what they count is logged below
        if self.live:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._log_live(), timeout=10)
        for manager in [*self.models.values(), *self.challengers.values()]:
            await manager.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
