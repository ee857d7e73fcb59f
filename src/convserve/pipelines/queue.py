"""The job queue as the API sees it: a job *is* an MLflow run, queued with Huey.

``submit`` creates the run ``SCHEDULED`` with the request as an artifact and enqueues its id
by task name (``convserve.contract.RUN_JOB_TASK``); ``convserve worker``
(``pipelines/worker.py``) registers the task and runs it. Torch-free, and registers no task:
the API process imports this module and nothing that trains.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convserve.contract import RUN_JOB_TASK, JobPayload
from convserve.training.config import NumbersRefuseBooleans, SweepConfig, TrainConfig

log = logging.getLogger(__name__)

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
    model_name: str = Field("convserve", min_length=1)
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


def make_queue(settings: JobSettings) -> Any:
    """The Huey instance: ``RedisHuey`` when ``REDIS_URL`` is set, else ``SqliteHuey``. No task
    is registered here; the worker registers the one it runs."""
    from huey import RedisHuey, SqliteHuey

    if settings.redis_url:
        return RedisHuey(settings.queue_name, url=settings.redis_url, results=False)
    os.makedirs(os.path.dirname(os.path.abspath(settings.queue_path)), exist_ok=True)
    return SqliteHuey(settings.queue_name, filename=settings.queue_path, results=False)


def enqueue(huey: Any, payload: JobPayload, task: str = RUN_JOB_TASK) -> None:
    """Put one message for ``task`` (a job, or a trial of a sweep job's study) on the queue
    by task name, as ``huey.enqueue`` would for a registered task, without the function being
    importable here."""
    from huey.registry import Message

    message = Message(
        id=str(uuid.uuid4()),
        name=task,
        retries=0,
        retry_delay=0,
        args=(payload.run_id,),
        kwargs={},
    )
    huey.storage.enqueue(huey.serializer.serialize(message), None)


def submit(request: JobRequest, client: Any, huey: Any) -> str:
    """Create the job's run ``SCHEDULED``, store the request on it and enqueue it."""
    from convserve.training.tracking import get_or_create_experiment, log_params

    cfg = request.config
    experiment = get_or_create_experiment(client, cfg.tracking.experiment)
    name = request.train.run_name() if request.train is not None else request.sweep.parent_name()  # type: ignore[union-attr]
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
        enqueue(huey, JobPayload(run_id=run_id))
    except Exception as err:
        fail(client, run_id, f"could not enqueue the job: {err}")
        raise
    return str(run_id)


def fail(client: Any, run_id: str, error: str, tags: dict[str, str] | None = None) -> None:
    """The error, ``tags`` and the status in one write: no reader sees a failed job without
    its error."""
    from mlflow.entities import RunTag

    all_tags = {**(tags or {}), "convserve.error": error[:5000], "convserve.job_status": "failed"}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
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
