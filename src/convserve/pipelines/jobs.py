"""Training jobs: a job *is* an MLflow run, queued with Huey.

``submit`` (the API) creates the run ``SCHEDULED`` with the request as an artifact and
enqueues its id; ``execute_job`` (a ``convserve worker``) trains or sweeps, exports, registers
and promotes. The worker heartbeats on the run; ``reap`` marks runs whose heartbeat is too old
as failed ("worker lost"). Importing this module imports no torch: the API uses it too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convserve.training.config import SweepConfig, TrainConfig

log = logging.getLogger(__name__)

TASK_NAME = "convserve.run_job"
REQUEST_ARTIFACT = "job/request.json"
JobStatus = Literal["scheduled", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
_FROM_MLFLOW = {
    "SCHEDULED": "scheduled",
    "RUNNING": "running",
    "FINISHED": "succeeded",
    "FAILED": "failed",
    "KILLED": "cancelled",
}
_TO_MLFLOW = {v: k for k, v in _FROM_MLFLOW.items()}


class JobSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONVSERVE_", extra="ignore", populate_by_name=True
    )

    redis_url: str | None = Field(None, validation_alias="REDIS_URL")  # RedisHuey when set
    queue_path: str = ".convserve/queue.db"  # SqliteHuey file otherwise
    queue_name: str = "convserve"
    max_queued_jobs: int = Field(100, ge=1)  # more waiting jobs are refused with 429
    heartbeat_interval: float = Field(5.0, gt=0)  # seconds between a worker's heartbeats
    worker_lost_after: float = Field(60.0, gt=0)  # heartbeat age that fails a running job
    reaper_interval: float = Field(15.0, gt=0)  # seconds between reaper passes of a worker
    cancel_check_interval: float = Field(1.0, gt=0)  # how often a running job looks for DELETE


class JobRequest(BaseModel):
    """``POST /jobs``: a training config or a sweep, and what may happen to the winner."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    train: TrainConfig | None = None  # one training run
    sweep: SweepConfig | None = None  # or a grid of them
    # export, check and register the result (the sweep's best run); "register" in JSON
    register_model: bool = Field(True, alias="register")
    promote: bool = True  # move the champion alias if the result beats the champion
    model_name: str = Field("convserve", min_length=1)
    margin: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _one_kind(self) -> JobRequest:
        if (self.train is None) == (self.sweep is None):
            raise ValueError("give exactly one of 'train' (a training config) and 'sweep'")
        return self

    @property
    def kind(self) -> str:
        return "train" if self.train is not None else "sweep"

    @property
    def config(self) -> TrainConfig:
        """The training config, or the sweep's base: where the job's own run is tracked."""
        return self.train if self.train is not None else self.sweep.base  # type: ignore[union-attr]


def make_queue(settings: JobSettings) -> tuple[Any, Any]:
    """(huey, task): ``RedisHuey`` when ``REDIS_URL`` is set, else ``SqliteHuey``."""
    from huey import RedisHuey, SqliteHuey

    if settings.redis_url:
        huey = RedisHuey(settings.queue_name, url=settings.redis_url, results=False)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(settings.queue_path)), exist_ok=True)
        huey = SqliteHuey(settings.queue_name, filename=settings.queue_path, results=False)
    task = huey.task(name=TASK_NAME)(execute_job)
    return huey, task


def submit(request: JobRequest, client: Any, task: Any) -> str:
    """Create the job's run ``SCHEDULED``, store the request on it and enqueue it."""
    from convserve.training.tracking import get_or_create_experiment, log_params

    cfg = request.config
    experiment = get_or_create_experiment(client, cfg.tracking.experiment)
    name = cfg.tracking.run_name or f"job-{request.kind}"
    run = client.create_run(
        experiment,
        run_name=name,
        tags={
            "convserve.kind": "job",
            "convserve.job_kind": request.kind,
            "convserve.job_status": "scheduled",
        },
    )
    run_id = run.info.run_id
    client.update_run(run_id, status="SCHEDULED")
    log_params(client, run_id, cfg)
    client.log_text(run_id, request.model_dump_json(indent=1, by_alias=True), REQUEST_ARTIFACT)
    try:
        task(run_id)
    except Exception as err:
        fail(client, run_id, f"could not enqueue the job: {err}")
        raise
    return str(run_id)


def fail(client: Any, run_id: str, error: str) -> None:
    """The error and the status in one write: no reader sees a failed job without its error."""
    from mlflow.entities import RunTag

    client.log_batch(
        run_id,
        tags=[RunTag("convserve.error", error[:5000]), RunTag("convserve.job_status", "failed")],
    )
    client.set_terminated(run_id, status="FAILED")


def job_status(run: Any) -> str:
    tag = run.data.tags.get("convserve.job_status")
    status = _FROM_MLFLOW.get(run.info.status, "running")
    # The run's own status is the truth once it has ended; the tag tells "still exporting".
    if run.info.status in ("FAILED", "KILLED"):
        return status
    return tag if tag in JOB_STATUSES else status


def cancel(client: Any, run: Any) -> str:
    """A queued job never starts; a running one stops at its next step boundary."""
    run_id = run.info.run_id
    status = job_status(run)
    if status == "scheduled":
        client.set_tag(run_id, "convserve.job_status", "cancelled")
        client.set_terminated(run_id, status="KILLED")
        return "cancelled"
    if status == "running":
        client.set_tag(run_id, "convserve.cancel_requested", "1")
    return status


def search_jobs(client: Any, where: str = "", **kwargs: Any) -> Any:
    """Job runs across every experiment (a page with its ``token``), ``where`` added to the
    filter; ``kwargs`` go to ``search_runs`` (paging, order)."""
    from mlflow.store.entities.paged_list import PagedList

    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return PagedList([], None)
    query = "tags.`convserve.kind` = 'job'" + (f" and {where}" if where else "")
    return client.search_runs(experiments, query, **kwargs)


def reap(client: Any, lost_after: float) -> list[str]:
    """Fail every running job whose heartbeat is older than ``lost_after`` seconds."""
    runs = search_jobs(client, "attributes.status = 'RUNNING'", max_results=1000)
    now, reaped = time.time(), []
    for run in runs:
        beat = float(run.data.tags.get("convserve.heartbeat", run.info.start_time / 1000))
        if now - beat > lost_after:
            fail(
                client,
                run.info.run_id,
                f"worker lost: no heartbeat for {now - beat:.0f} s "
                f"(last from {run.data.tags.get('convserve.worker', 'unknown')})",
            )
            reaped.append(run.info.run_id)
    return reaped


class _Heartbeat:
    """Beats on the run from a thread, and throttles progress tags and cancel checks."""

    def __init__(self, client: Any, run_id: str, settings: JobSettings) -> None:
        self.client, self.run_id, self.settings = client, run_id, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self.progress: dict[str, Any] = {}

    def __enter__(self) -> _Heartbeat:
        self.client.set_tag(self.run_id, "convserve.heartbeat", f"{time.time():.3f}")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
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
        now = time.monotonic()
        if (
            not self._cancelled
            and now - self._last_cancel_check > self.settings.cancel_check_interval
        ):
            self._last_cancel_check = now
            tags = self.client.get_run(self.run_id).data.tags
            self._cancelled = tags.get("convserve.cancel_requested") == "1"
        return self._cancelled


def execute_job(run_id: str) -> None:
    """The Huey task: run one job to its end, whatever happens."""
    from mlflow.tracking import MlflowClient

    settings = JobSettings()
    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != "SCHEDULED" or job_status(run) != "scheduled":
        log.info("job %s is %s: not started", run_id, job_status(run))
        return
    # A heartbeat before RUNNING, so that no reaper takes a starting job for a lost one.
    client.set_tag(run_id, "convserve.heartbeat", f"{time.time():.3f}")
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "convserve.job_status", "running")
    client.set_tag(run_id, "convserve.worker", f"{socket.gethostname()}:{os.getpid()}")
    client.log_metric(run_id, "job.started", 1.0)  # one point per execution: none run twice
    try:
        text = client.download_artifacts(run_id, REQUEST_ARTIFACT)
        with open(text) as f:
            request = JobRequest.model_validate_json(f.read())
        with _Heartbeat(client, run_id, settings) as beat:
            status = _run(request, run_id, client, beat)
        client.set_tag(run_id, "convserve.job_status", status)
        client.set_terminated(run_id, status=_TO_MLFLOW.get(status, "FINISHED"))
    except Exception as err:
        log.exception("job %s failed", run_id)
        fail(client, run_id, f"{type(err).__name__}: {err}")


def _run(request: JobRequest, run_id: str, client: Any, beat: _Heartbeat) -> str:
    from convserve.pipelines.registry import Policy, publish
    from convserve.pipelines.sweep import run_sweep
    from convserve.training.run import Callbacks, train

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
    if request.train is not None:
        result = train(_tracked(request.train, tracking_uri), run_id=run_id, callbacks=callbacks)
        if result.status == "cancelled":
            return "cancelled"
        if result.status != "finished":
            client.set_tag(run_id, "convserve.error", result.message[:5000])
            return "failed"
        if request.register_model:
            published = publish(run_id=run_id, tracking_uri=tracking_uri, policy=policy)
            _record_publication(client, run_id, published)
        return "succeeded"
    assert request.sweep is not None
    sweep = request.sweep.model_copy(update={"base": _tracked(request.sweep.base, tracking_uri)})
    outcome = run_sweep(
        sweep,
        policy=policy if request.register_model else None,
        should_stop=beat.should_stop,
        parent_run_id=run_id,
    )
    if beat.should_stop():
        return "cancelled"
    if outcome.published is not None:
        _record_publication(client, run_id, outcome.published)
    return "succeeded" if outcome.best_run_id else "failed"


def _tracked(cfg: TrainConfig, tracking_uri: str) -> TrainConfig:
    """``cfg`` tracked on the worker's MLflow server, whatever the request said."""
    tracking = cfg.tracking.model_copy(update={"enabled": True, "tracking_uri": tracking_uri})
    return cfg.model_copy(update={"tracking": tracking})


def _record_publication(client: Any, run_id: str, published: Any) -> None:
    if published.version is not None:
        client.set_tag(run_id, "convserve.registered_version", str(published.version))
        client.set_tag(run_id, "convserve.registered_model", str(published.model_name))
        # Registered without a promotion decision (promote=false) is "not promoted" too.
        promoted = published.decision is not None and published.decision.promoted
        client.set_tag(run_id, "convserve.promoted", str(promoted).lower())
