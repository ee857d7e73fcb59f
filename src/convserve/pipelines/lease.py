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

from convserve.jobs import Tag

log = logging.getLogger(__name__)

# The MlflowClient attributes that only read: they pass. Every other attribute, a write that
# a newer MLflow adds included, goes through the lease (fails closed).
READS = frozenset(
    {
        "tracking_uri",
        "download_artifacts",
        "get_experiment",
        "get_experiment_by_name",
        "get_metric_history",
        "get_model_version",
        "get_model_version_by_alias",
        "get_model_version_download_uri",
        "get_parent_run",
        "get_registered_model",
        "get_run",
        "list_artifacts",
        "search_experiments",
        "search_model_versions",
        "search_registered_models",
        "search_runs",
    }
)


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
        # The answer is as old as the question: a process stopped (SIGSTOP, a paused VM)
        # while the read was on its way gets an answer from before it stopped, which must not
        # count as fresh when it wakes up.
        asked = time.monotonic()
        try:
            run = self.client.get_run(self.run_id)
        except Exception as err:  # the tracking server blinked: keep the last answer
            log.warning("lease check of %s failed: %s", self.run_id, err)
            return
        tags = run.data.tags
        self._checked = asked
        self._held = (
            run.info.status == "RUNNING"
            and tags.get(Tag.WORKER) == self.worker
            and tags.get(Tag.ATTEMPT, "1") == str(self.attempt)
        )
        self.cancelled = tags.get(Tag.CANCEL_REQUESTED) == "1"
        if not self._held:
            log.warning(
                "job %s: lease lost (run %s, worker %s, attempt %s): writing nothing more",
                self.run_id,
                run.info.status,
                tags.get(Tag.WORKER),
                tags.get(Tag.ATTEMPT),
            )

    def may_publish(self) -> bool:
        """Fresh: the lease is held and no cancel was asked for (before export, registration,
        promotion)."""
        return self.held(fresh=True) and not self.cancelled


class GuardedClient:
    """An ``MlflowClient`` whose reads (``READS``) pass and whose every other call happens
    only while ``lease`` is held (else it is skipped and answers None)."""

    def __init__(self, client: Any, lease: Lease) -> None:
        self._client, self._lease = client, lease

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in READS:
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if not self._lease.held():
                log.info("job %s: %s skipped, the lease is lost", self._lease.run_id, name)
                return None
            return attr(*args, **kwargs)

        return guarded
