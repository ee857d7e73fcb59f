"""The job queue's contract, shared by the API and ``convserve worker``, and torch-free.

A job *is* an MLflow run, queued with Huey. This module holds what both sides must agree on:
the task names a job is enqueued under and the payload a message carries, the request stored
on the run, the run's tags (its status, and the worker's lease: worker, attempt, heartbeat),
the settings of the queue, and the operations both sides use. ``submit`` creates the run
``SCHEDULED`` with the request as an artifact and enqueues its id through a task registered
under its contract name; in the API that task is a stub, which no process runs: only
``convserve worker`` (``pipelines/worker.py``) registers the functions that do the work.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convserve.redact import redact
from convserve.training.config import NumbersRefuseBooleans, SweepConfig, TrainConfig

RUN_JOB_TASK = "convserve.run_job"  # Huey task name: one training job (a train or a sweep)
RUN_TRIAL_TASK = "convserve.run_trial"  # one trial of a sweep job's study (payload: the sweep's)
REQUEST_ARTIFACT = "job/request.json"  # the JobRequest, on the job's run


class JobPayload(BaseModel):
    """What a queued job message carries: the run id. The request itself is on the run."""

    model_config = ConfigDict(frozen=True)

    run_id: str = Field(min_length=1)


class Tag:
    """The tags of a job's run. ``WORKER``, ``ATTEMPT`` and the run's ``RUNNING`` status are
    the lease: the one worker that may write the job's result (``pipelines/lease.py``)."""

    KIND = "convserve.kind"  # "job" on every job's run
    JOB_KIND = "convserve.job_kind"  # "train" or "sweep"
    STATUS = "convserve.job_status"  # a JobStatus (the run's status says when it ended)
    ERROR = "convserve.error"
    PROGRESS = "convserve.progress"  # JSON: epoch, step, total (and a sweep's trials)
    CANCEL_REQUESTED = "convserve.cancel_requested"  # "1": stop at the next step boundary
    WORKER = "convserve.worker"  # host:pid:thread of the worker holding the lease
    ATTEMPT = "convserve.attempt"  # 1, 2, ...: a rescheduled job's new attempt ends the lease
    ATTEMPTS = "convserve.attempts"  # JSON: the attempts that ended without a result
    DRAINS = "convserve.drains"  # attempts handed back by a draining worker: not failures
    HEARTBEAT = "convserve.heartbeat"  # epoch seconds of the holder's last beat
    PHASE = "convserve.phase"  # a sweep job: "trials" while its trials run, then "publish"


JobStatus = Literal["scheduled", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
_FROM_MLFLOW = {
    "SCHEDULED": "scheduled",
    "RUNNING": "running",
    "FINISHED": "succeeded",
    "FAILED": "failed",
    "KILLED": "cancelled",
}
TO_MLFLOW = {v: k for k, v in _FROM_MLFLOW.items()}  # job status -> MLflow run status


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
    # where a worker writes its jobs' checkpoints, plots and exports (one folder per run),
    # whatever tracking.output_dir the request says: that path is the client's, not the worker's
    runs_dir: str = "runs"
    # Optuna's storage for sweeps (a SQLAlchemy URL: the stack's PostgreSQL); unset: a SQLite
    # file beside the local queue file
    study_storage: str | None = None
    # a training job lost with its worker is run again, from its last checkpoint, this often
    job_retries: int = Field(1, ge=0, le=10)
    # written by a running worker every heartbeat_interval while its queue answers; read by
    # `convserve worker --check`, the container health check
    worker_liveness_file: str = Field(
        default_factory=lambda: os.path.join(tempfile.gettempdir(), "convserve-worker.alive")
    )
    worker_alive_after: float = Field(60.0, gt=0)  # liveness file age that fails the check
    # a worker's job process (the one that imports torch) exits after this many seconds
    # without a task, and the next task starts a new one; 0: one after each task
    worker_idle_exit: float = Field(30.0, ge=0)
    # on SIGTERM a worker takes no new task; its job or trial stops at the next step, keeps
    # its place and goes back to the queue; the worker exits within this many seconds (keep
    # it below compose's stop_grace_period and Kubernetes' terminationGracePeriodSeconds)
    drain_seconds: float = Field(45.0, gt=0)


# Set by `convserve worker` for the job process it starts: the worker's pid, which names the
# worker on the runs it takes (Tag.WORKER), whichever of its processes does the work.
WORKER_PID = "CONVSERVE_WORKER_PID"


def worker_id() -> str:
    """``host:pid:thread`` of the worker running this code: the pid is the worker process's
    (``WORKER_PID`` in its job process), so that a supervisor's pid names its jobs."""
    pid = os.environ.get(WORKER_PID) or str(os.getpid())
    return f"{socket.gethostname()}:{pid}:{threading.get_ident()}"


class JobRequest(NumbersRefuseBooleans):
    """``POST /jobs``: a training config or a sweep, and what may happen to the winner."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            # exactly one of the two, in the schema as in the validator below
            "oneOf": [
                {"required": ["train"], "properties": {"train": {"type": "object"}}},
                {"required": ["sweep"], "properties": {"sweep": {"type": "object"}}},
            ],
            "examples": [
                {
                    "train": {
                        "model": {"activation": "relu", "blocks": [{"out_channels": 16}]},
                        "init": {"name": "he_normal"},
                        "optim": {"epochs": 3},
                    },
                    "register": True,
                    "promote": True,
                },
                {
                    "sweep": {
                        "base": {"optim": {"epochs": 1}},
                        "grid": {"init.name": ["xavier_uniform", "he_normal"]},
                    },
                    "model_name": "convserve",
                },
            ],
        },
    )

    train: TrainConfig | None = None  # one training run
    sweep: SweepConfig | None = None  # or a grid of them
    # export, check and register the result (the sweep's best run); "register" in JSON
    register_model: bool = Field(True, alias="register")
    promote: bool = True  # move the champion alias if the result beats the champion
    # the registered model the result goes to; default: the uploaded data set's name for a
    # run trained on one, else convserve (pipelines/registry.model_name_for)
    model_name: str | None = Field(None, min_length=1)
    margin: float = Field(0.0, ge=0.0)
    # a train job on several data-parallel processes of its worker's machine (torchrun)
    nproc_per_node: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _one_kind(self) -> JobRequest:
        if (self.train is None) == (self.sweep is None):
            raise ValueError("give exactly one of 'train' (a training config) and 'sweep'")
        if self.sweep is not None and self.nproc_per_node > 1:
            raise ValueError("nproc_per_node is for train jobs; a sweep spreads its trials")
        if self.train is not None and self.train.data.batch_size % self.nproc_per_node:
            raise ValueError(
                f"train.data.batch_size {self.train.data.batch_size} is the global batch: it "
                f"must split evenly over nproc_per_node={self.nproc_per_node} processes"
            )
        return self

    @property
    def kind(self) -> str:
        return "train" if self.train is not None else "sweep"

    @property
    def config(self) -> TrainConfig:
        """The training config, or the sweep's base: where the job's own run is tracked."""
        return self.train if self.train is not None else self.sweep.base  # type: ignore[union-attr]


class Huey(Protocol):
    """The part of ``huey.Huey`` the queue uses (``RedisHuey`` and ``SqliteHuey`` have it)."""

    def task(self, *, name: str) -> Callable[[Callable[[str], None]], Any]: ...
    def pending_count(self) -> int: ...
    def pending(self, limit: int | None = None) -> list[Any]: ...
    def dequeue(self) -> Any: ...
    def execute(self, task: Any, timestamp: Any = None) -> Any: ...


def _runs_on_a_worker(run_id: str) -> None:
    raise RuntimeError(f"job {run_id}: this process only enqueues; `convserve worker` runs jobs")


REDIS_TIMEOUT_SECONDS = 10


class JobQueue:
    """The Huey queue with the job and trial tasks registered under their contract names:
    ``RedisHuey`` when ``REDIS_URL`` is set, else ``SqliteHuey``. The API passes no functions
    and so registers stubs, with which it enqueues; the worker passes the functions it runs."""

    def __init__(
        self,
        settings: JobSettings,
        run_job: Callable[[str], None] = _runs_on_a_worker,
        run_trial: Callable[[str], None] = _runs_on_a_worker,
    ) -> None:
        from huey import RedisHuey, SqliteHuey

        self.huey: Huey
        if settings.redis_url:
            from redis import ConnectionPool

            # a Redis that does not answer fails a call in seconds (503), not never
            pool = ConnectionPool.from_url(
                settings.redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
            )
            self.huey = RedisHuey(settings.queue_name, connection_pool=pool, results=False)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(settings.queue_path)), exist_ok=True)
            self.huey = SqliteHuey(settings.queue_name, filename=settings.queue_path, results=False)
        self._tasks = {
            RUN_JOB_TASK: self._register(RUN_JOB_TASK, run_job),
            RUN_TRIAL_TASK: self._register(RUN_TRIAL_TASK, run_trial),
        }

    def _register(self, task: str, function: Callable[[str], None]) -> Any:
        module, name = task.rsplit(".", 1)

        def run(run_id: str) -> None:
            function(run_id)

        run.__module__ = module  # Huey names a task "<function module>.<name>": the contract's
        return self.huey.task(name=name)(run)

    def enqueue(self, run_id: str, task: str = RUN_JOB_TASK) -> None:
        """One message for ``task`` (a job, or a trial of a sweep job's study) with the run's
        id."""
        self._tasks[task](JobPayload(run_id=run_id).run_id)

    def pending_count(self) -> int:
        return self.huey.pending_count()

    def waiting(self, task: str, run_id: str) -> bool:
        """Whether a message of ``task`` for ``run_id`` waits on the queue."""
        return any(
            f"{type(m).__module__}.{type(m).__name__}" == task and tuple(m.args) == (run_id,)
            for m in self.huey.pending()
        )


def submit(request: JobRequest, client: Any, queue: JobQueue) -> str:
    """Create the job's run ``SCHEDULED``, store the request on it and enqueue it."""
    from convserve.training.tracking import get_or_create_experiment, log_params

    cfg = request.config
    experiment = get_or_create_experiment(client, cfg.tracking.experiment)
    name = request.train.run_name() if request.train is not None else request.sweep.parent_name()  # type: ignore[union-attr]
    run = client.create_run(
        experiment,
        run_name=name,
        tags={
            Tag.KIND: "job",
            Tag.JOB_KIND: request.kind,
            Tag.STATUS: "scheduled",
        },
    )
    run_id = run.info.run_id
    client.update_run(run_id, status="SCHEDULED")
    log_params(client, run_id, cfg)
    client.log_text(run_id, request.model_dump_json(indent=1, by_alias=True), REQUEST_ARTIFACT)
    try:
        queue.enqueue(run_id)
    except Exception as err:
        fail(client, run_id, f"could not enqueue the job: {err}")
        raise
    return str(run_id)


def fail(client: Any, run_id: str, error: str, tags: dict[str, str] | None = None) -> None:
    """The error, ``tags`` and the status in one write: no reader sees a failed job without
    its error."""
    from convserve.training.tracking import run_tags

    all_tags = {**(tags or {}), Tag.ERROR: redact(error)[:5000], Tag.STATUS: "failed"}
    client.log_batch(run_id, tags=run_tags(all_tags))
    client.set_terminated(run_id, status="FAILED")


def job_status(run: Any) -> str:
    tag = run.data.tags.get(Tag.STATUS)
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
        client.set_tag(run_id, Tag.STATUS, "cancelled")
        client.set_terminated(run_id, status="KILLED")
        return "cancelled"
    if status == "running":
        client.set_tag(run_id, Tag.CANCEL_REQUESTED, "1")
    return status


def experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def search_everywhere(
    client: Any, query: str, experiments: list[str] | None = None, **kwargs: Any
) -> Any:
    """Runs matching ``query`` in every experiment (``experiments``: their ids, where the
    caller read them already), a page with its ``token``; ``kwargs`` go to ``search_runs``
    (paging, order)."""
    from mlflow.store.entities.paged_list import PagedList

    experiments = experiment_ids(client) if experiments is None else experiments
    if not experiments:
        return PagedList([], None)
    return client.search_runs(experiments, query, **kwargs)


def search_jobs(
    client: Any, where: str = "", experiments: list[str] | None = None, **kwargs: Any
) -> Any:
    """Job runs across every experiment, ``where`` added to the filter."""
    query = f"tags.`{Tag.KIND}` = 'job'" + (f" and {where}" if where else "")
    return search_everywhere(client, query, experiments, **kwargs)
