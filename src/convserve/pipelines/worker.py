"""``convserve worker``: take jobs and sweep trials from the queue and run them to their end.

The worker registers the job task and the trial task under their contract names
(``convserve.contract.RUN_JOB_TASK``, ``RUN_TRIAL_TASK``) and runs each job: train, then
export, register and promote, writing only while it holds the job's lease (``lease.py``). A
sweep job creates its Optuna study and puts ``parallelism`` trial tasks on the queue, which any
worker takes; each trial task trains one trial and queues the next while trials wait, and the
one that ends the study hands the sweep job back to the queue to publish the best trial
(``study.py``). It heartbeats on the job's run while it works; its
reaper thread takes jobs whose heartbeat is too old from their worker: a job is scheduled
again while it has attempts left (``CONVSERVE_JOB_RETRIES``; a training job resumes from its
last checkpoint), else failed ("worker lost"). For a sweep's trials it fails those whose Optuna
heartbeat is too old (and queues a retry with the same values while retries are left), and
queues a trial task when trials wait and none runs. The API never imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna

from convserve.contract import RUN_JOB_TASK, RUN_TRIAL_TASK, JobPayload
from convserve.pipelines import liveness
from convserve.pipelines import study as studies
from convserve.pipelines.lease import GuardedClient, Lease
from convserve.pipelines.queue import (
    REQUEST_ARTIFACT,
    TO_MLFLOW,
    JobRequest,
    JobSettings,
    enqueue,
    fail,
    job_status,
    make_queue,
    search_jobs,
)
from convserve.pipelines.registry import Policy, PublishCancelled, publish
from convserve.pipelines.sweep import finish, record_progress, run_trial, search_tags, worker_id
from convserve.training.config import SweepConfig, TrainConfig
from convserve.training.run import Callbacks, train

log = logging.getLogger(__name__)


def register_task(huey: Any, settings: JobSettings) -> None:
    """Register ``execute_job`` and ``execute_trial`` on ``huey`` under the names they are
    enqueued by."""

    def run_job(run_id: str) -> None:
        execute_job(run_id, settings, huey)

    def run_trial(run_id: str) -> None:
        execute_trial(run_id, settings, huey)

    for task, function in ((RUN_TRIAL_TASK, run_trial), (RUN_JOB_TASK, run_job)):
        module, name = task.rsplit(".", 1)
        # Huey names a task "<function module>.<task name>": make that the contract's name.
        function.__module__ = module
        huey.task(name=name)(function)


def run_worker(settings: JobSettings, say: Any = log.info) -> None:
    """Consume jobs one at a time until interrupted, with the reaper in a thread."""
    from mlflow.tracking import MlflowClient

    huey = make_queue(settings)
    register_task(huey, settings)
    stop = threading.Event()
    threading.Thread(
        target=_reaper, args=(settings, stop, huey), daemon=True, name="convserve-reaper"
    ).start()
    liveness.keep_alive(
        Path(settings.worker_liveness_file), settings.heartbeat_interval, huey.pending_count, stop
    )
    queue = f"redis {settings.queue_name}" if settings.redis_url else settings.queue_path
    say(f"convserve worker: queue {queue}, tracking {MlflowClient().tracking_uri}")
    # An idle worker looks at the queue at least every second (Huey's default backs off to
    # ten): a sweep's trial tasks are taken by whichever worker is free.
    consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False, max_delay=1.0)
    try:
        consumer.run()
    finally:
        stop.set()


def _reaper(settings: JobSettings, stop: threading.Event, huey: Any) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    while True:
        try:
            for run_id in reap(client, settings, huey):
                log.warning("job %s: worker lost", run_id)
            tend_studies(client, settings, huey)
        except Exception as err:  # the tracking server may be down for a moment
            log.warning("reaper pass failed: %s", err)
        if stop.wait(settings.reaper_interval):
            return


def reap(client: Any, settings: JobSettings, huey: Any = None) -> list[str]:
    """Take every running job whose heartbeat is older than ``worker_lost_after`` seconds
    from its worker: a job with attempts left is scheduled again (a training job resumes from
    its last checkpoint, a sweep keeps the grid points it finished), one without is failed
    ("worker lost"). Either ends the lost worker's lease."""
    runs = search_jobs(client, "attributes.status = 'RUNNING'", max_results=1000)
    now, reaped = time.time(), []
    for run in runs:
        tags = run.data.tags
        if tags.get("convserve.phase") == "trials":
            continue  # a sweep between setup and publishing: its trials beat (tend_studies)
        beat = float(tags.get("convserve.heartbeat", run.info.start_time / 1000))
        if now - beat <= settings.worker_lost_after:
            continue
        reason = (
            f"worker lost: no heartbeat for {now - beat:.0f} s "
            f"(last from {tags.get('convserve.worker', 'unknown')})"
        )
        attempt = int(tags.get("convserve.attempt", "1"))
        history = [*json.loads(tags.get("convserve.attempts", "[]")), _attempt(tags, reason)]
        if attempt <= settings.job_retries and huey is not None:
            _schedule_again(client, huey, run.info.run_id, attempt + 1, history)
        else:
            attempts = {"convserve.attempts": json.dumps(history)[:5000]}
            fail(client, run.info.run_id, reason, attempts)
        reaped.append(run.info.run_id)
    return reaped


def _attempt(tags: dict[str, str], ended: str) -> dict[str, Any]:
    return {
        "attempt": int(tags.get("convserve.attempt", "1")),
        "worker": tags.get("convserve.worker", "unknown"),
        "ended": ended,
    }


def _schedule_again(
    client: Any, huey: Any, run_id: str, attempt: int, history: list[dict[str, Any]]
) -> None:
    from mlflow.entities import RunTag

    client.log_batch(
        run_id,
        tags=[
            RunTag("convserve.attempt", str(attempt)),  # ends the lost worker's lease
            RunTag("convserve.attempts", json.dumps(history)[:5000]),
            RunTag("convserve.job_status", "scheduled"),
        ],
    )
    client.update_run(run_id, status="SCHEDULED")
    enqueue(huey, JobPayload(run_id=run_id))


class _Heartbeat:
    """Beats on the run from a thread while the lease is held, publishes progress, and tells
    training to stop when the job is cancelled or the lease is lost."""

    def __init__(self, client: Any, lease: Lease, settings: JobSettings) -> None:
        self.client, self.lease, self.settings = client, lease, settings
        self.run_id = lease.run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._last_progress = 0.0
        self.progress: dict[str, Any] = {}

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            if not self.lease.held(fresh=True):
                return  # someone else owns the job now: no more beats
            try:
                self.client.set_tag(self.run_id, "convserve.heartbeat", f"{time.time():.3f}")
            except Exception as err:  # the tracking server may blink; try again next beat
                log.warning("heartbeat of %s failed: %s", self.run_id, err)

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
            self.client.set_tag(self.run_id, "convserve.progress", json.dumps(self.progress))

    def should_stop(self) -> bool:
        """At every step: cancelled, or the lease lost (checked every few seconds)."""
        return not self.lease.held() or self.lease.cancelled


def execute_job(run_id: str, settings: JobSettings, huey: Any = None) -> None:
    """The Huey task: run one job to its end, whatever happens, writing only while its lease
    is held."""
    from mlflow.tracking import MlflowClient

    raw = MlflowClient()
    run = raw.get_run(run_id)
    if run.info.status != "SCHEDULED" or job_status(run) != "scheduled":
        log.info("job %s is %s: not started", run_id, job_status(run))
        return
    attempt = int(run.data.tags.get("convserve.attempt", "1"))
    worker = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    # A heartbeat before RUNNING, so that no reaper takes a starting job for a lost one.
    raw.set_tag(run_id, "convserve.heartbeat", f"{time.time():.3f}")
    _take(raw, run_id, worker, attempt)
    lease = Lease(raw, run_id, worker, attempt, settings.cancel_check_interval)
    client = GuardedClient(raw, lease)
    client.log_metric(run_id, "job.started", 1.0)  # one point per execution
    try:
        text = raw.download_artifacts(run_id, REQUEST_ARTIFACT)
        with open(text) as f:
            request = JobRequest.model_validate_json(f.read())
        resume = _last_checkpoint(raw, run_id, settings.runs_dir) if attempt > 1 else None
        with _Heartbeat(client, lease, settings) as beat:
            if request.sweep is not None:
                status = _sweep(request, run_id, client, beat, settings, huey)
            else:
                status = _run(request, run_id, client, beat, settings.runs_dir, resume)
        if status == "running":
            return  # a sweep's trials are on the queue; the one that ends the study returns it
        client.set_tag(run_id, "convserve.job_status", status)
        client.set_terminated(run_id, status=TO_MLFLOW.get(status, "FINISHED"))
    except Exception as err:
        log.exception("job %s failed", run_id)
        if lease.held(fresh=True):
            fail(client, run_id, f"{type(err).__name__}: {err}")


def _take(client: Any, run_id: str, worker: str, attempt: int) -> None:
    from mlflow.entities import RunTag

    client.update_run(run_id, status="RUNNING")
    client.log_batch(
        run_id,
        tags=[
            RunTag("convserve.job_status", "running"),
            RunTag("convserve.worker", worker),
            RunTag("convserve.attempt", str(attempt)),
        ],
    )


def _last_checkpoint(client: Any, run_id: str, runs_dir: str) -> Path | None:
    """The lost attempt's ``last.pt`` from the run's artifacts (None: start over)."""
    folder = Path(runs_dir) / run_id / "resume"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, "checkpoints/last.pt", str(folder)))
    except Exception as err:  # lost before its first epoch ended: nothing to resume from
        log.info("job %s: no checkpoint to resume from (%s); starting over", run_id, err)
        return None


def _run(
    request: JobRequest,
    run_id: str,
    client: Any,
    beat: _Heartbeat,
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
    )
    tracking_uri = client.tracking_uri
    assert request.train is not None  # a sweep job runs through _sweep
    cfg = _tracked(request.train, tracking_uri, runs_dir)
    if resume is not None:
        client.set_tag(run_id, "convserve.resumed_from", "checkpoints/last.pt")
    if request.nproc_per_node > 1:
        status, message = _train_processes(
            cfg, request.nproc_per_node, run_id, tracking_uri, beat, resume
        )
    else:
        result = train(
            cfg, run_id=run_id, callbacks=callbacks, client=client, resume=resume, end_run=False
        )
        status, message = result.status, result.message
    if status == "cancelled":
        return "cancelled"
    if status != "finished":
        client.set_tag(run_id, "convserve.error", message[:5000])
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
    beat: _Heartbeat,
    settings: JobSettings,
    huey: Any,
) -> str:
    """A sweep job: create its study and queue its trials ("running": the trial tasks carry
    it on), or, when every trial has ended, publish the best one."""
    sweep = _tracked_sweep(request, client.tracking_uri, settings.runs_dir)
    storage = studies.open_storage(settings)
    study = studies.ensure(sweep, run_id, storage)
    if not beat.lease.may_publish():  # cancelled (or no longer this worker's)
        studies.fail_waiting(study, studies.CANCELLED)
    if not studies.done(study):
        from mlflow.entities import RunTag

        tags = {**search_tags(sweep), "convserve.phase": "trials"}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        record_progress(client, run_id, sweep, study)
        waiting = studies.counts(study)["waiting"]
        for _ in range(min(sweep.parallelism, waiting)):
            enqueue(huey, JobPayload(run_id=run_id), RUN_TRIAL_TASK)
        return "running"
    client.set_tag(run_id, "convserve.phase", "publish")
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
    if beat.should_stop():
        return "cancelled"
    if outcome.published is not None:
        _record_publication(client, run_id, outcome.published)
    return "succeeded" if outcome.best_run_id else "failed"


def _tracked_sweep(request: JobRequest, tracking_uri: str, runs_dir: str) -> SweepConfig:
    assert request.sweep is not None
    return request.sweep.model_copy(
        update={"base": _tracked(request.sweep.base, tracking_uri, runs_dir)}
    )


_requests: dict[str, JobRequest] = {}  # a sweep's request, read once per worker process


def _request(client: Any, run_id: str) -> JobRequest:
    if run_id not in _requests:
        with open(client.download_artifacts(run_id, REQUEST_ARTIFACT)) as f:
            _requests[run_id] = JobRequest.model_validate_json(f.read())
    return _requests[run_id]


def execute_trial(run_id: str, settings: JobSettings, huey: Any) -> None:
    """The trial task: train one waiting trial of the sweep job ``run_id``, then queue the
    next one while trials wait, or, when the study has ended, hand the job back to the queue
    to publish (once, whichever worker ends the study)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(run_id)
    if parent.info.status != "RUNNING" or parent.data.tags.get("convserve.phase") != "trials":
        log.info("sweep %s is %s: trial task dropped", run_id, job_status(parent))
        return
    sweep = _tracked_sweep(_request(client, run_id), client.tracking_uri, settings.runs_dir)
    storage = studies.open_storage(settings)
    study = studies.load(sweep, run_id, storage)
    cancel = _ParentCancel(client, run_id, settings.cancel_check_interval)
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
        enqueue(huey, JobPayload(run_id=run_id), RUN_TRIAL_TASK)
    else:
        _publish_when_done(client, study, run_id, storage, huey)


def _publish_when_done(client: Any, study: Any, run_id: str, storage: Any, huey: Any) -> bool:
    """When no trial waits or runs, the one caller that takes the study's publish ticket
    schedules the sweep job again: the job path publishes under a lease, like any job."""
    if not studies.take_publish_ticket(study, storage):
        return False
    from mlflow.entities import RunTag

    client.log_batch(
        run_id,
        tags=[RunTag("convserve.phase", "publish"), RunTag("convserve.job_status", "scheduled")],
    )
    client.update_run(run_id, status="SCHEDULED")
    enqueue(huey, JobPayload(run_id=run_id))
    log.info("sweep %s: every trial ended; publishing", run_id)
    return True


class _ParentCancel:
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
            self._cancelled = (
                tags.get("convserve.cancel_requested") == "1" or run.info.status != "RUNNING"
            )
        return self._cancelled


def tend_studies(client: Any, settings: JobSettings, huey: Any) -> None:
    """For every sweep whose trials are on the queue: fail the trials whose worker is gone
    (their child run too) and queue a retry while retries are left; queue a trial task when
    trials wait and none runs (a task lost with its worker); publish when the study ended."""
    runs = search_jobs(
        client, "attributes.status = 'RUNNING' and tags.`convserve.phase` = 'trials'"
    )
    for run in runs:
        run_id = run.info.run_id
        sweep = _tracked_sweep(_request(client, run_id), client.tracking_uri, settings.runs_dir)
        storage = studies.open_storage(settings)
        study = studies.load(sweep, run_id, storage)
        optuna.storages.fail_stale_trials(study)
        counts = studies.counts(study)
        if counts["waiting"] and not counts["running"] and not _queued_trials(huey, run_id):
            enqueue(huey, JobPayload(run_id=run_id), RUN_TRIAL_TASK)
        elif not counts["waiting"] and not counts["running"]:
            _publish_when_done(client, study, run_id, storage, huey)


def _queued_trials(huey: Any, run_id: str) -> bool:
    """Whether a trial task of this sweep waits on the queue."""
    try:
        return any(
            getattr(task, "name", "").endswith("run_trial") and tuple(task.args) == (run_id,)
            for task in huey.pending()
        )
    except Exception as err:  # a message this worker cannot read: assume one waits
        log.warning("could not read the queue: %s", err)
        return True


def _train_processes(
    cfg: TrainConfig,
    nproc: int,
    run_id: str,
    tracking_uri: str,
    beat: _Heartbeat,
    resume: Path | None,
) -> tuple[str, str]:
    """A train job on ``nproc`` data-parallel processes: ``torchrun`` runs ``python -m
    convserve.training`` on the job's run (rank 0 logs to it and uploads its checkpoints),
    while this worker beats, publishes the progress and stops the processes (SIGTERM: they
    keep ``last.pt``) when the job is cancelled or its lease is lost. (status, message)."""
    import signal
    import subprocess

    from convserve.training.distributed import torchrun

    folder = Path(cfg.tracking.output_dir) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.json"
    config.write_text(cfg.model_dump_json())
    argv, env = torchrun(
        nproc,
        [
            *(["--resume", str(resume)] if resume is not None else ["--config", str(config)]),
            *(["--set", f"tracking.output_dir={cfg.tracking.output_dir}"] if resume else []),
            "--run-id",
            run_id,
            "--keep-run-open",
        ],
    )
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    result: dict[str, Any] = {}
    tail: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.info("job %s: %s", run_id, line.rstrip())
            tail[:] = [*tail[-20:], line.rstrip()]
            if line.startswith("epoch "):
                beat.on_epoch(int(line.split()[1].rstrip(":")), {})
            elif line.startswith("result: "):
                result.update(json.loads(line.removeprefix("result: ")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopping = False
    while proc.poll() is None:
        if not stopping and beat.should_stop():
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it to every rank
            stopping = True
        time.sleep(0.2)
    reader.join(timeout=10)
    if "status" in result:
        return str(result["status"]), str(result.get("message", ""))
    return "failed", f"torchrun exited {proc.returncode}: " + " / ".join(tail[-5:])


def _tracked(cfg: TrainConfig, tracking_uri: str, runs_dir: str) -> TrainConfig:
    """``cfg`` tracked on the worker's MLflow server and written under the worker's runs
    folder, whatever the request said."""
    tracking = cfg.tracking.model_copy(
        update={"enabled": True, "tracking_uri": tracking_uri, "output_dir": runs_dir}
    )
    return cfg.model_copy(update={"tracking": tracking})


def _record_publication(client: Any, run_id: str, published: Any) -> None:
    if published.version is not None:
        client.set_tag(run_id, "convserve.registered_version", str(published.version))
        client.set_tag(run_id, "convserve.registered_model", str(published.model_name))
        # Registered without a promotion decision (promote=false) is "not promoted" too.
        promoted = published.decision is not None and published.decision.promoted
        client.set_tag(run_id, "convserve.promoted", str(promoted).lower())
