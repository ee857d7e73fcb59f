"""A worker's lease on a job: the result of a job is written once, by its owner, or not at all.

When a worker starts a job it writes its worker id and the attempt number on the job's run.
The reaper takes a job from a worker that stopped beating by failing it or by scheduling the
next attempt, either of which ends the lease. Every write the worker makes for the job goes
through ``GuardedClient``, which first checks that the run is still ``RUNNING`` under this
worker and attempt: a worker that was stopped (``SIGSTOP``) past the lost-worker limit and
resumes writes nothing more (no status, no metric, no registration) and stops at its next
step. MLflow has no compare-and-set, so the check and the write are two calls; the window
between them is a few milliseconds against a limit of a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# MlflowClient methods that write to a run or the registry.
_WRITES = {
    "set_tag",
    "set_tags",
    "log_batch",
    "log_metric",
    "log_param",
    "log_text",
    "log_dict",
    "log_artifact",
    "log_artifacts",
    "log_figure",
    "log_image",
    "set_terminated",
    "update_run",
    "delete_tag",
    "create_registered_model",
    "create_model_version",
    "set_registered_model_alias",
    "set_model_version_tag",
    "delete_model_version",
}


class Lease:
    """This worker's hold on one job's run; ``held()`` answers from a recent check."""

    def __init__(self, client: Any, run_id: str, worker: str, attempt: int, interval: float):
        self.client, self.run_id, self.worker, self.attempt = client, run_id, worker, attempt
        self.interval = interval  # seconds a check stays fresh
        self._checked = -float("inf")
        self._held = True
        self.cancelled = False
        self._lock = threading.Lock()

    def held(self, fresh: bool = False) -> bool:
        """Whether the run is still ``RUNNING`` under this worker and attempt (read again when
        the last check is older than ``interval``, or ``fresh``). Once lost, lost for good."""
        with self._lock:
            if not self._held:
                return False
            if fresh or time.monotonic() - self._checked > self.interval:
                self._check()
            return self._held

    def _check(self) -> None:
        try:
            run = self.client.get_run(self.run_id)
        except Exception as err:  # the tracking server blinked: keep the last answer
            log.warning("lease check of %s failed: %s", self.run_id, err)
            return
        tags = run.data.tags
        self._checked = time.monotonic()
        self._held = (
            run.info.status == "RUNNING"
            and tags.get("convserve.worker") == self.worker
            and tags.get("convserve.attempt", "1") == str(self.attempt)
        )
        self.cancelled = tags.get("convserve.cancel_requested") == "1"
        if not self._held:
            log.warning(
                "job %s: lease lost (run %s, worker %s, attempt %s): writing nothing more",
                self.run_id,
                run.info.status,
                tags.get("convserve.worker"),
                tags.get("convserve.attempt"),
            )

    def may_publish(self) -> bool:
        """Fresh: the lease is held and no cancel was asked for (before export, registration,
        promotion)."""
        return self.held(fresh=True) and not self.cancelled


class GuardedClient:
    """An ``MlflowClient`` whose writes happen only while ``lease`` is held; reads pass."""

    def __init__(self, client: Any, lease: Lease) -> None:
        self._client, self._lease = client, lease

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in _WRITES:
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if not self._lease.held():
                log.info("job %s: %s skipped, the lease is lost", self._lease.run_id, name)
                return None
            return attr(*args, **kwargs)

        return guarded
