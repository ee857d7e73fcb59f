"""What a running job and a running trial watch while they train: the job's heartbeat (its
lease kept alive, its progress published, its cancel request heard) and a trial's parent
sweep."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from convserve.jobs import JobSettings, Tag
from convserve.pipelines.lease import Lease
from convserve.processes import SignalFlag

log = logging.getLogger(__name__)

# Set by the job process on SIGTERM (its worker drains): the running job or trial stops at
# the next step, keeps its exact place in a checkpoint and goes back to the queue.
draining = SignalFlag()  # set by the job process's SIGTERM handler: no lock


class Heartbeat:
    """Beats on the run from a thread while the lease is held, publishes progress, and tells
    training to stop when the job is cancelled or the lease is lost."""

    def __init__(
        self, client: Any, lease: Lease, settings: JobSettings, last_beat: float | None = None
    ) -> None:
        """``last_beat``: when the job's last beat was written (epoch seconds; the one before
        it was taken), for the warning on a late beat."""
        self.client, self.lease, self.settings = client, lease, settings
        self._last_beat = time.time() if last_beat is None else last_beat
        self.run_id = lease.run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._last_progress = 0.0
        self.progress: dict[str, Any] = {}

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        """A beat at once (the job's set-up since the last one took time), then one every
        ``heartbeat_interval`` seconds."""
        while True:
            if not self.lease.held(fresh=True):
                return  # someone else owns the job now: no more beats
            try:
                now = time.time()
                self.client.set_tag(self.run_id, Tag.HEARTBEAT, f"{now:.3f}")
            except Exception as err:  # the tracking server may blink; try again next beat
                log.warning("heartbeat of %s failed: %s", self.run_id, err)
            else:
                if not self.lease.held():
                    return  # the beat was not written (the lease client skips it)
                self._late(now - self._last_beat)
                self._last_beat = now
            if self._stop.wait(self.settings.heartbeat_interval):
                return

    def _late(self, gap: float) -> None:
        """Warn when beats came far enough apart that a reaper nearly took the job (it does
        after ``worker_lost_after`` seconds): a busy machine or a slow tracking server."""
        if gap > self.settings.worker_lost_after / 2:
            log.warning(
                "heartbeat of %s late: %.1f s since the last (a job is taken from its worker "
                "after %g s, CONVSERVE_WORKER_LOST_AFTER)",
                self.run_id,
                gap,
                self.settings.worker_lost_after,
            )

    def on_start(self, total: int) -> None:
        self.progress["total"] = total
        self._publish(force=True)

    def on_step(self, step: int, loss: float, accuracy: float) -> None:
        self.progress["step"] = step
        self._publish()

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.progress["epoch"] = epoch
        self._publish(force=True)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_progress > 2.0:
            self._last_progress = now
            self.client.set_tag(self.run_id, Tag.PROGRESS, json.dumps(self.progress))

    def should_stop(self) -> bool:
        """At every step: cancelled, the lease lost (checked every few seconds), or the
        worker draining."""
        return not self.lease.held() or self.lease.cancelled or draining.is_set()

    def handing_back(self, fresh: bool = True) -> bool:
        """Whether a stop is the worker's drain (the job goes back to the queue), not a
        cancel or a lost lease (``fresh``: the lease read again, before the hand-back)."""
        return draining.is_set() and not self.lease.cancelled and self.lease.held(fresh)


class ParentCancel:
    """Whether the sweep a trial belongs to was cancelled (or ended), read again every
    ``interval`` seconds."""

    def __init__(self, client: Any, run_id: str, interval: float) -> None:
        self.client, self.run_id, self.interval = client, run_id, interval
        self._checked, self._cancelled = -float("inf"), False

    def __call__(self) -> bool:
        if not self._cancelled and time.monotonic() - self._checked > self.interval:
            self._checked = time.monotonic()
            try:
                run = self.client.get_run(self.run_id)
            except Exception as err:  # the tracking server blinked: ask again later
                log.warning("cancel check of sweep %s failed: %s", self.run_id, err)
                return False
            tags = run.data.tags
            self._cancelled = tags.get(Tag.CANCEL_REQUESTED) == "1" or run.info.status != "RUNNING"
        return self._cancelled
