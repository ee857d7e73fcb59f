"""Service settings from the environment (``CONVSERVE_*``), read once at start-up."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convserve.redact import redact

if TYPE_CHECKING:
    from convserve.training.uploads import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", extra="ignore")

    # A local .onnx file, models:/NAME@ALIAS (followed: polled for new versions) or
    # models:/NAME/VERSION (pinned).
    model_uri: str = "models:/convserve@champion"
    # The served set besides that default model (which bare /predict answers with): comma-
    # separated entries, each a registered model's name or an fnmatch pattern of names, followed
    # at the default model URI's alias ("*": every registered model that has it; names are
    # read only when the default model URI is models:/NAME@ALIAS), a models:/ URI or a .onnx
    # file. "": the default model alone.
    models: str = "*"
    # resident memory the loaded models may take in each worker process, in MiB (0: no limit).
    # Past it the least recently used model is unloaded (never the default one) and loaded
    # again on its next request, answered 503 with Retry-After while it loads.
    model_memory_mb: int = Field(0, ge=0)
    # of each model's requests, the share also sent to its challenger (the version at its
    # "challenger" alias) off the response path, and the share it answers instead (canary);
    # PUT /v1/models/{name}/rollout sets them per model
    shadow_share: float = Field(0.0, ge=0.0, le=1.0)
    canary_share: float = Field(0.0, ge=0.0, le=1.0)
    # how often each process logs what the challengers showed to their MLflow runs (live.*)
    rollout_log_seconds: float = Field(30.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda without a GPU fails at start
    # onnxruntime threads per operator in each worker; 0: the cores divided among the workers
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(0, ge=0)
    poll_interval: float = Field(10.0, gt=0)  # seconds between registry checks of the alias
    # on SIGTERM a process answers as before, /readyz excepted (503 "draining"), for this many
    # seconds, so that a load balancer or a Service stops sending to it before it stops
    # listening; then it finishes the requests it holds and exits (0: at once)
    shutdown_delay: float = Field(0.0, ge=0.0, le=120.0)
    cache_dir: str = ".convserve-models"  # where registry versions are downloaded
    api_token: SecretStr | None = None  # bearer token for admin endpoints and job writes

    batching: bool = True  # gather concurrent requests into one session.run
    # unset: chosen when a model is loaded, from its measured cost per image at each batch
    # size (engine.plan_batches)
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_batch_wait_ms: float | None = Field(None, ge=0.0, le=1000.0)

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # per request body
    # longest wait for the next piece of a request body: a stalled upload is answered 408
    # and closed (nginx's client_body_timeout)
    body_read_timeout: float = Field(30.0, gt=0, le=3600)
    # POST /datasets: the archive, what it may unpack to, its entries (files and folders)
    # and classes, sized for a small machine (2 cores, 4 GB of memory, a few GB of disk);
    # each image's pixels are limited by max_pixels, as on /predict
    max_dataset_bytes: int = Field(1 << 30, ge=1024)
    max_dataset_expanded_bytes: int = Field(2 << 30, ge=1024)
    max_dataset_files: int = Field(100_000, ge=1)
    max_dataset_classes: int = Field(1_000, ge=2)
    max_dataset_ingests: int = Field(2, ge=1, le=64)  # at once per process; more: 429
    max_pixels: int = Field(40_000_000, ge=1)  # width * height of one image, checked first
    # images above 65,536 pixels decoded at once, in their own threads; more wait, then 503
    max_large_decodes: int = Field(2, ge=1, le=64)
    max_files: int = Field(64, ge=1)  # images per /predict request
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # estimated, before encoding
    # heavy requests in flight per process, in units (service/admission.py); 0: from the
    # process's onnxruntime threads and the machine's memory
    admission_budget: int = Field(0, ge=0)
    # how long a heavy request over the budget waits for the ones in flight, then 503
    admission_wait: float = Field(0.5, ge=0, le=60)
    # the heavy requests' thread's nice value: 19, light requests first whenever the cores
    # are short (a heavy request gets what they leave); 0, an equal share
    heavy_niceness: int = Field(19, ge=0, le=19)
    default_top_k: int = Field(5, ge=1)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # KServe v2 over gRPC on this port (every worker process binds it); unset: no gRPC
    grpc_port: int | None = Field(None, ge=1, le=65535)
    # uvicorn worker processes; 0: one per core the process may use (at most MAX_AUTO_WORKERS),
    # one with a GPU
    workers: int = Field(0, ge=0, le=64)
    mlflow_ui_url: str | None = None  # shown on the web page and in job links
    # set by `convserve serve` for its worker processes: where one passes the admin requests
    # (reload, load, unload) on to the others
    peers_dir: str | None = None

    @model_validator(mode="after")
    def _shares(self) -> Settings:
        if self.shadow_share + self.canary_share > 1:
            raise ValueError("CONVSERVE_SHADOW_SHARE + CONVSERVE_CANARY_SHARE must be at most 1")
        return self

    @field_validator("mlflow_ui_url")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        """Shown to anyone who opens the page: never with its credentials."""
        return None if url is None else redact(url)

    def admission_budget_units(self) -> int:
        """``admission_budget``, or the one chosen from threads and memory."""
        from convserve.service.admission import auto_budget

        return self.admission_budget or auto_budget(self.intra_op_threads, self.workers)

    def dataset_limits(self) -> Limits:
        """What one data set upload may hold (``POST /datasets``, ``convserve data add``)."""
        from convserve.training.uploads import Limits

        return Limits(
            self.max_dataset_bytes,
            self.max_dataset_expanded_bytes,
            self.max_dataset_files,
            self.max_dataset_classes,
            self.max_pixels,
        )

    def resolved(self, cuda: bool = False) -> Settings:
        """These settings with ``workers`` and ``intra_op_threads`` chosen where they are 0:
        on CPU, one worker per core that this process may use (at most ``MAX_AUTO_WORKERS``)
        and the cores divided among them as onnxruntime threads. HTTP parsing and image
        decoding run in Python, one core per process, so processes, not operator threads,
        are what a small model's throughput needs. With a GPU, one worker: each process
        would hold its own CUDA context and memory arena, and batching keeps the GPU fed."""
        if self.workers and self.intra_op_threads:  # chosen already: nothing to read
            return self
        cores = available_cores()
        workers = self.workers or (1 if cuda else min(cores, MAX_AUTO_WORKERS))
        threads = self.intra_op_threads or max(1, cores // workers)
        return self.model_copy(update={"workers": workers, "intra_op_threads": threads})


MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container's ``--cpus``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores
