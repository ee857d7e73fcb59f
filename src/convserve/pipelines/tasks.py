"""What a worker's job process runs: the job and trial tasks, taken from the queue one at a
time, in a process of their own (``worker.py`` starts it).

A job is run to its end: train, then export, register and promote, writing only while the job's
lease is held (``lease.py``) and beating on the job's run while it works (``heartbeat.py``; a
job on several processes runs under ``torchrun``, ``launch.py``). A sweep job creates its
Optuna study and puts ``parallelism`` trial tasks on the queue, which any worker takes; each
trial task trains one trial and queues the next while trials wait, and the one that ends the
study hands the sweep job back to the queue to publish the best trial (``study.py``).

This is the module that imports torch: the worker process itself never does, so that an idle
worker does not hold it. The job process takes tasks while there are any and exits after
``CONVSERVE_WORKER_IDLE_EXIT`` idle seconds; it dies with its worker (``PR_SET_PDEATHSIG``), as
a job did when it ran inside the worker. The API never imports this module.

    python -m convserve.pipelines.tasks   (started by ``convserve worker``)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from convserve import logs
from convserve.jobs import (
    RUN_TRIAL_TASK,
    TO_MLFLOW,
    WORKER_PID,
    JobQueue,
    JobRequest,
    JobSettings,
    Tag,
    fail,
    job_status,
    worker_id,
)
from convserve.pipelines import study as studies
from convserve.pipelines.heartbeat import Heartbeat, ParentCancel, draining
from convserve.pipelines.launch import train_processes
from convserve.pipelines.lease import GuardedClient, Lease
from convserve.pipelines.reaper import hand_back, publish_when_done
from convserve.pipelines.registry import Policy, PublishCancelled, publish
from convserve.pipelines.runs import last_checkpoint, read_request, tracked, tracked_sweep
from convserve.pipelines.sweep import finish, record_progress, run_trial, search_tags
from convserve.processes import SignalFlag, die_with_parent
from convserve.training.run import Callbacks, train
from convserve.training.tracking import run_tags

log = logging.getLogger(__name__)


def job_queue(settings: JobSettings) -> JobQueue:
    """The queue with ``execute_job`` and ``execute_trial`` registered under the names they
    are enqueued by."""
    queue: JobQueue

    def run_job(run_id: str) -> None:
        execute_job(run_id, settings, queue)

    def run_trial(run_id: str) -> None:
        execute_trial(run_id, settings, queue)

    queue = JobQueue(settings, run_job=run_job, run_trial=run_trial)
    return queue


def run_tasks(settings: JobSettings, stopping: SignalFlag) -> int:
    """Take tasks from the queue and run them, one at a time, until none has come for
    ``worker_idle_exit`` seconds or ``stopping`` is set; the number run. An idle process looks
    at the queue every second at most (a sweep's trial tasks are taken by whichever worker
    is free)."""
    queue = job_queue(settings)
    huey = queue.huey
    done, idle_since = 0, time.monotonic()
    while not stopping.is_set():
        task = huey.dequeue()
        if task is None:
            if time.monotonic() - idle_since >= settings.worker_idle_exit:
                return done
            stopping.wait(min(1.0, settings.worker_idle_exit))
            continue
        huey.execute(task)  # Huey logs a task that raises; the task records its own failure
        done += 1
        idle_since = time.monotonic()
    return done


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when the worker that started it dies (even by
    SIGKILL), so that no job runs on without its worker; exit now if it is gone already."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(0)


def main() -> None:
    parent = int(os.environ.get(WORKER_PID, "0"))
    if parent:
        _die_with(parent)
    logs.configure(logging.INFO)
    # a log file, not a terminal: no bar redrawn for every artifact a job downloads
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ctrl-C (the terminal's SIGINT reaches the worker and this process) and the worker's
    # SIGINT: the task being run finishes, and no other is taken. SIGTERM (the worker
    # drains): no other is taken either, and the running one stops at the next step, keeps
    # its place and goes back to the queue.
    stopping = SignalFlag()  # set by signal handlers: no lock (processes.SignalFlag)
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    def drain(*_: object) -> None:
        draining.set()
        stopping.set()

    signal.signal(signal.SIGTERM, drain)
    settings = JobSettings()
    done = run_tasks(settings, stopping)
    why = "drained" if draining.is_set() else "stopped" if stopping.is_set() else "idle"
    log.info(
        "job process %d: %d task%s run, %s: exiting", os.getpid(), done, "s" * (done != 1), why
    )


def execute_job(run_id: str, settings: JobSettings, queue: JobQueue | None = None) -> None:
    """The Huey task: run one job to its end, whatever happens, writing only while its lease
    is held."""
    from convserve.training.tracking import mlflow_client

    raw = mlflow_client()
    run = raw.get_run(run_id)
    if run.info.status != "SCHEDULED" or job_status(run) != "scheduled":
        log.info("job %s is %s: not started", run_id, job_status(run))
        return
    attempt = int(run.data.tags.get(Tag.ATTEMPT, "1"))
    worker = worker_id()
    # A heartbeat before RUNNING, so that no reaper takes a starting job for a lost one.
    first_beat = time.time()
    raw.set_tag(run_id, Tag.HEARTBEAT, f"{first_beat:.3f}")
    _take(raw, run_id, worker, attempt)
    lease = Lease(raw, run_id, worker, attempt, settings.cancel_check_interval)
    client = GuardedClient(raw, lease)
    try:
        request = read_request(raw, run_id)
        resume = last_checkpoint(raw, run_id, settings.runs_dir) if attempt > 1 else None
        with Heartbeat(client, lease, settings, first_beat) as beat:
            if request.sweep is not None:
                status = _sweep(request, run_id, client, beat, settings, queue)
            else:
                status = _run(request, run_id, client, beat, settings.runs_dir, resume)
        if status == "running":
            return  # a sweep's trials are on the queue; the one that ends the study returns it
        if status == "requeue":
            step = beat.progress.get("step", 0)
            why = f"handed back by its draining worker at step {step}"
            hand_back(raw, queue or JobQueue(settings), raw.get_run(run_id), why)
            log.info("job %s: %s; back on the queue", run_id, why)
            return
        client.set_tag(run_id, Tag.STATUS, status)
        client.set_terminated(run_id, status=TO_MLFLOW.get(status, "FINISHED"))
    except Exception as err:
        log.exception("job %s failed", run_id)
        if lease.held(fresh=True):
            fail(client, run_id, f"{type(err).__name__}: {err}")


def _take(client: Any, run_id: str, worker: str, attempt: int) -> None:
    """``RUNNING``, then in one write the worker, the attempt and one ``job.started`` point
    (one per execution): no reader sees the job taken by a worker without its start counted."""
    from mlflow.entities import Metric, RunTag

    client.update_run(run_id, status="RUNNING")
    client.log_batch(
        run_id,
        metrics=[Metric("job.started", 1.0, int(time.time() * 1000), 0)],
        tags=[
            RunTag(Tag.STATUS, "running"),
            RunTag(Tag.WORKER, worker),
            RunTag(Tag.ATTEMPT, str(attempt)),
        ],
    )


def _run(
    request: JobRequest,
    run_id: str,
    client: Any,
    beat: Heartbeat,
    runs_dir: str,
    resume: Path | None = None,
) -> str:
    policy = Policy(
        request.model_name, request.register_model, request.promote, margin=request.margin
    )
    callbacks = Callbacks(
        on_start=beat.on_start,
        on_step=beat.on_step,
        on_epoch=beat.on_epoch,
        should_stop=beat.should_stop,
        stop_status=lambda: "stopped" if beat.handing_back(fresh=False) else "cancelled",
    )
    tracking_uri = client.tracking_uri
    assert request.train is not None  # a sweep job runs through _sweep
    cfg = tracked(request.train, tracking_uri, runs_dir)
    if resume is not None:
        client.set_tag(run_id, "convserve.resumed_from", "checkpoints/last.pt")
    if request.nproc_per_node > 1:
        status, message = train_processes(
            cfg, request.nproc_per_node, run_id, tracking_uri, beat, resume
        )
    else:
        result = train(
            cfg, run_id=run_id, callbacks=callbacks, client=client, resume=resume, end_run=False
        )
        status, message = result.status, result.message
    if status in ("cancelled", "stopped"):
        return "requeue" if beat.handing_back() else "cancelled"
    if status != "finished":
        client.set_tag(run_id, Tag.ERROR, message[:5000])
        return "failed"
    if request.register_model:
        try:
            published = publish(
                run_id=run_id, policy=policy, proceed=beat.lease.may_publish, client=client
            )
        except PublishCancelled:
            return "cancelled"
        _record_publication(client, run_id, published)
    return "succeeded" if beat.lease.may_publish() else "cancelled"


def _sweep(
    request: JobRequest,
    run_id: str,
    client: Any,
    beat: Heartbeat,
    settings: JobSettings,
    queue: JobQueue | None,
) -> str:
    """A sweep job: create its study and queue its trials ("running": the trial tasks carry
    it on), or, when every trial has ended, publish the best one."""
    sweep = tracked_sweep(request, client.tracking_uri, settings.runs_dir)
    storage = studies.open_storage(settings)
    study = studies.ensure(sweep, run_id, storage)
    if not beat.lease.may_publish():  # cancelled (or no longer this worker's)
        studies.fail_waiting(study, studies.CANCELLED)
    if not studies.done(study):
        tags = {**search_tags(sweep), Tag.PHASE: "trials"}
        client.log_batch(run_id, tags=run_tags(tags))
        record_progress(client, run_id, sweep, study)
        waiting = studies.counts(study)["waiting"]
        for _ in range(min(sweep.parallelism, waiting)):
            assert queue is not None, "a sweep job runs on a worker's queue"
            queue.enqueue(run_id, RUN_TRIAL_TASK)
        return "running"
    client.set_tag(run_id, Tag.PHASE, "publish")
    policy = Policy(
        request.model_name, request.register_model, request.promote, margin=request.margin
    )
    try:
        outcome = finish(
            sweep,
            run_id,
            study,
            client,
            policy if request.register_model and not beat.lease.cancelled else None,
            proceed=beat.lease.may_publish,
        )
    except PublishCancelled:
        return "cancelled"
    if not beat.lease.may_publish():  # cancelled or taken (a drain lets publishing end)
        return "cancelled"
    if outcome.published is not None:
        _record_publication(client, run_id, outcome.published)
    return "succeeded" if outcome.best_run_id else "failed"


def execute_trial(run_id: str, settings: JobSettings, queue: JobQueue) -> None:
    """The trial task: train one waiting trial of the sweep job ``run_id``, then queue the
    next one while trials wait, or, when the study has ended, hand the job back to the queue
    to publish (once, whichever worker ends the study)."""
    from convserve.training.tracking import mlflow_client

    client = mlflow_client()
    parent = client.get_run(run_id)
    if parent.info.status != "RUNNING" or parent.data.tags.get(Tag.PHASE) != "trials":
        log.info("sweep %s is %s: trial task dropped", run_id, job_status(parent))
        return
    request = read_request(client, run_id, cache=True)
    sweep = tracked_sweep(request, client.tracking_uri, settings.runs_dir)
    storage = studies.open_storage(settings)
    study = studies.load(sweep, run_id, storage)
    cancel = ParentCancel(client, run_id, settings.cancel_check_interval)
    if cancel():
        studies.fail_waiting(study, studies.CANCELLED)
    else:
        row = run_trial(
            sweep,
            run_id,
            study,
            storage,
            client,
            worker=worker_id(),
            settings=settings,
            parent_cancelled=cancel,
        )
        if row is not None:
            log.info("sweep %s: trial %s %s (%s)", run_id, row.number, row.status, row.value)
        if cancel():
            studies.fail_waiting(study, studies.CANCELLED)
    record_progress(client, run_id, sweep, study)
    if studies.counts(study)["waiting"] > 0:
        queue.enqueue(run_id, RUN_TRIAL_TASK)
    else:
        publish_when_done(client, study, run_id, storage, queue)


def _record_publication(client: Any, run_id: str, published: Any) -> None:
    if published.version is not None:
        client.set_tag(run_id, "convserve.registered_version", str(published.version))
        client.set_tag(run_id, "convserve.registered_model", str(published.model_name))
        # Registered without a promotion decision (promote=false) is "not promoted" too.
        promoted = published.decision is not None and published.decision.promoted
        client.set_tag(run_id, "convserve.promoted", str(promoted).lower())


if __name__ == "__main__":
    main()
