"""The reaper: a thread of every worker that takes jobs from workers that stopped beating.

A running job whose heartbeat is older than ``CONVSERVE_WORKER_LOST_AFTER`` is scheduled
again while it has attempts left (``CONVSERVE_JOB_RETRIES``; a training job resumes from its
last checkpoint), else failed ("worker lost"); either ends the lost worker's lease. For a
sweep's trials it fails those whose Optuna heartbeat is too old, queues a trial task when
trials wait and none runs or waits on the queue, and hands a sweep whose study has ended back
to the queue to publish.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import optuna

from convserve.jobs import (
    RUN_TRIAL_TASK,
    JobQueue,
    JobSettings,
    Tag,
    experiment_ids,
    fail,
    search_jobs,
)
from convserve.pipelines import study as studies
from convserve.pipelines.runs import read_request, tracked_sweep
from convserve.processes import SignalFlag
from convserve.training.tracking import run_tags

log = logging.getLogger(__name__)
PAGE = 200  # running jobs read per search


def run_reaper(settings: JobSettings, stop: SignalFlag, queue: JobQueue) -> None:
    """A pass every ``reaper_interval`` seconds until ``stop`` is set."""
    from convserve.training.tracking import mlflow_client

    client = mlflow_client()
    while True:
        try:
            for run_id in reap(client, settings, queue):
                log.warning("job %s: worker lost", run_id)
            tend_studies(client, settings, queue)
        except Exception as err:  # the tracking server may be down for a moment
            log.warning("reaper pass failed: %s", err)
        if stop.wait(settings.reaper_interval):
            return


def running_jobs(client: Any, where: str = "") -> Iterator[Any]:
    """Every running job, page by page."""
    query = "attributes.status = 'RUNNING'" + (f" and {where}" if where else "")
    experiments, token = experiment_ids(client), None
    while True:
        page = search_jobs(client, query, experiments, max_results=PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def reap(client: Any, settings: JobSettings, queue: JobQueue | None = None) -> list[str]:
    """Take every running job whose heartbeat is older than ``worker_lost_after`` seconds
    from its worker: a job with attempts left is scheduled again (a training job resumes from
    its last checkpoint, a sweep keeps the grid points it finished), one without is failed
    ("worker lost"). Either ends the lost worker's lease."""
    now = time.time()
    lost = [run for run in running_jobs(client) if _lost_for(run, now, settings) is not None]
    taken = []
    for listed in lost:  # after the search: a reaped job leaves the pages being read
        # Read again: the listing may be older than another worker's reaper taking the job
        # (the job scheduled again, perhaps running on its next attempt by now). Taken only
        # if it is still the same attempt, lost.
        run = client.get_run(listed.info.run_id)
        age = _lost_for(run, time.time(), settings)
        if age is None or _holder(run) != _holder(listed):
            continue
        taken.append(run.info.run_id)
        tags = run.data.tags
        reason = f"worker lost: no heartbeat for {age:.0f} s (last from {_worker(tags)})"
        attempt = int(tags.get(Tag.ATTEMPT, "1"))
        history = [*json.loads(tags.get(Tag.ATTEMPTS, "[]")), _attempt(tags, reason)]
        record = {Tag.ATTEMPTS: json.dumps(history)[:5000]}
        failures = attempt - int(tags.get(Tag.DRAINS, "0"))  # a drained attempt is no failure
        if failures <= settings.job_retries and queue is not None:
            _schedule_again(
                client, queue, run.info.run_id, {**record, Tag.ATTEMPT: str(attempt + 1)}
            )
        else:
            fail(client, run.info.run_id, reason, record)
    return taken


def _lost_for(run: Any, now: float, settings: JobSettings) -> float | None:
    """How long a running job's heartbeat has been silent, when that is longer than
    ``worker_lost_after``; else None (a sweep between setup and publishing has its trials
    beat instead, ``tend_studies``)."""
    tags = run.data.tags
    if run.info.status != "RUNNING" or tags.get(Tag.PHASE) == "trials":
        return None
    age = now - float(tags.get(Tag.HEARTBEAT, run.info.start_time / 1000))
    return age if age > settings.worker_lost_after else None


def _holder(run: Any) -> tuple[str, str]:
    """The lease a job's run shows: its worker and attempt."""
    tags = run.data.tags
    return _worker(tags), tags.get(Tag.ATTEMPT, "1")


def _worker(tags: dict[str, str]) -> str:
    return tags.get(Tag.WORKER, "unknown")


def _attempt(tags: dict[str, str], ended: str) -> dict[str, Any]:
    return {"attempt": int(tags.get(Tag.ATTEMPT, "1")), "worker": _worker(tags), "ended": ended}


def hand_back(client: Any, queue: JobQueue, run: Any, why: str) -> None:
    """A draining worker gives its running job back to the queue (through its lease): the
    next attempt, which resumes from the checkpoint just written, with the drain recorded
    and not counted against the job's retries."""
    tags = run.data.tags
    history = [*json.loads(tags.get(Tag.ATTEMPTS, "[]")), _attempt(tags, why)]
    record = {
        Tag.ATTEMPTS: json.dumps(history)[:5000],
        Tag.ATTEMPT: str(int(tags.get(Tag.ATTEMPT, "1")) + 1),
        Tag.DRAINS: str(int(tags.get(Tag.DRAINS, "0")) + 1),
    }
    _schedule_again(client, queue, run.info.run_id, record)


def _schedule_again(client: Any, queue: JobQueue, run_id: str, tags: dict[str, str]) -> None:
    """Hand the job back to the queue: the run ``SCHEDULED`` first (the old lease ends, and
    no reaper's search of running jobs lists it again), then ``tags`` and its status
    ``scheduled`` in one write, then its message enqueued. Tags first would show, for a
    moment, a running job on its next attempt with the lost attempt's stale heartbeat, which
    another reaper would take for lost again and fail."""
    client.update_run(run_id, status="SCHEDULED")
    client.log_batch(run_id, tags=run_tags({**tags, Tag.STATUS: "scheduled"}))
    queue.enqueue(run_id)


def tend_studies(client: Any, settings: JobSettings, queue: JobQueue) -> None:
    """For every sweep whose trials are on the queue: fail the trials whose worker is gone
    (their child run too) and queue a retry while retries are left; queue a trial task when
    trials wait and none runs (a task lost with its worker); publish when the study ended."""
    for run in running_jobs(client, f"tags.`{Tag.PHASE}` = 'trials'"):
        run_id = run.info.run_id
        request = read_request(client, run_id, cache=True)
        sweep = tracked_sweep(request, client.tracking_uri, settings.runs_dir)
        # opened only while a sweep runs (one per process): most workers never touch it
        storage = studies.open_storage(settings)
        study = studies.load(sweep, run_id, storage)
        optuna.storages.fail_stale_trials(study)
        counts = studies.counts(study)
        if counts["waiting"] and not counts["running"] and not _trial_queued(queue, run_id):
            queue.enqueue(run_id, RUN_TRIAL_TASK)
        elif not counts["waiting"] and not counts["running"]:
            publish_when_done(client, study, run_id, storage, queue)


def _trial_queued(queue: JobQueue, run_id: str) -> bool:
    try:
        return queue.waiting(RUN_TRIAL_TASK, run_id)
    except Exception as err:  # a message this worker cannot read: assume one waits
        log.warning("could not read the queue: %s", err)
        return True


def publish_when_done(
    client: Any,
    study: optuna.Study,
    run_id: str,
    storage: studies.Storage,
    queue: JobQueue,
) -> bool:
    """When no trial waits or runs, the one caller that takes the study's publish ticket
    schedules the sweep job again: the job path publishes under a lease, like any job."""
    if not studies.take_publish_ticket(study, storage):
        return False
    _schedule_again(client, queue, run_id, {Tag.PHASE: "publish"})
    log.info("sweep %s: every trial ended; publishing", run_id)
    return True
