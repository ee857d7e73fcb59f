"""MLflow logging of a training run through an explicit ``MlflowClient``.

No global state: the fluent API keeps an active-run stack per process, which breaks when runs
are created by one process and executed by another (jobs). The tracking URI comes from the
config, else ``MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from convserve.redact import redact
from convserve.training.config import TrackingConfig, TrainConfig

log = logging.getLogger(__name__)

_BATCH = 100  # MLflow accepts at most 100 params and 1000 metrics per log_batch call


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def tracking_uri(cfg: TrackingConfig) -> str:
    import mlflow

    return cfg.tracking_uri or mlflow.get_tracking_uri()


_CREATED: set[str] = set()  # the SQLite stores this process has seen with their tables
_CREATING = threading.Lock()


def mlflow_client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``uri`` (``MLFLOW_TRACKING_URI``, else MLflow's default). A
    SQLite store is opened by one process at a time until its tables are made: MLflow makes
    them in whichever process first opens a new file, and two doing so at once
    (``convserve serve``'s workers starting in a new folder) both try, and one fails ("table
    logged_models already exists", then "Online migration expected to match one row")."""
    import mlflow
    from mlflow.tracking import MlflowClient

    store = uri or mlflow.get_tracking_uri()
    if not store.startswith("sqlite:") or store in _CREATED:
        return MlflowClient(store)
    digest = hashlib.sha256(store.encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"convserve-store-{digest}.lock"
    with _CREATING, open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        client = MlflowClient(store)  # opens the store, and makes its tables if it is new
        _CREATED.add(store)
    return client


def _local_artifacts(client: Any, experiment: str) -> str | None:
    """With a SQLite file store, artifacts live beside it (``mlartifacts/<experiment>``), not
    in MLflow's default ``./mlruns`` of whatever folder the process started in."""
    uri = str(client.tracking_uri)
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides where its artifacts go
    folder = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (folder / slug).as_uri()


def get_or_create_experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=_local_artifacts(client, name)))
    except MlflowException:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def run_tags(tags: dict[str, Any]) -> list[Any]:
    """``tags`` as MLflow ``RunTag``s, every value redacted (``redact.py``): what any
    writer of a run's tags sends."""
    from mlflow.entities import RunTag

    return [RunTag(k, redact(str(v))) for k, v in tags.items()]


def log_params(client: Any, run_id: str, config: TrainConfig) -> None:
    """The config's flattened fields as the run's params, in batches MLflow accepts."""
    from mlflow.entities import Param

    params = [Param(k, redact(v)) for k, v in config.flat().items()]
    for i in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[i : i + _BATCH])


class Tracker:
    """One MLflow run; every method is a no-op when tracking is disabled."""

    def __init__(self, cfg: TrackingConfig, client: Any = None, end_run: bool = True) -> None:
        """``client``: an ``MlflowClient`` to write through (a job's guarded one); by default
        one for ``cfg``'s tracking URI. ``end_run=False``: ``end`` leaves the run open."""
        self.cfg = cfg
        self.end_run = end_run
        self.enabled = cfg.enabled
        self.run_id: str | None = None
        self._client: Any = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(tracking_uri(self.cfg))
        return self._client

    def start(
        self, config: TrainConfig, run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str | None:
        """Start a new run, or continue ``run_id`` (a resumed or scheduled run)."""
        if not self.enabled:
            return None
        all_tags = {"convserve.config_hash": config.digest(), **(tags or {})}
        commit = git_commit()
        if commit:
            all_tags["convserve.git_commit"] = commit
        if run_id is None:
            experiment_id = get_or_create_experiment(self.client, self.cfg.experiment)
            run = self.client.create_run(experiment_id, run_name=config.run_name(), tags=all_tags)
            self.run_id = run.info.run_id
            log_params(self.client, self.run_id, config)
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(all_tags)
        return self.run_id

    def log_metrics(
        self, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None
    ) -> None:
        """``metrics`` at ``step``, and ``tags`` in the same request (MLflow takes 1,000
        metrics a batch)."""
        if not self.enabled or self.run_id is None or not (metrics or tags):
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        extra = run_tags(tags or {})
        for i in range(0, max(len(items), 1), 1000):
            batch_tags, extra = extra, []
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000], tags=batch_tags)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled or self.run_id is None:
            return
        self.client.log_batch(self.run_id, tags=run_tags(tags))

    def clear_tags(self, names: list[str]) -> None:
        """Remove the run's tags ``names`` where it has them (what an earlier attempt left)."""
        if not self.enabled or self.run_id is None:
            return
        present = self.client.get_run(self.run_id).data.tags
        for name in names:
            if name in present:
                self.client.delete_tag(self.run_id, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if self.enabled and self.run_id is not None:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id is not None and folder.exists():
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str) -> None:
        """``FINISHED``, ``FAILED`` or ``KILLED``."""
        if self.enabled and self.run_id is not None and self.end_run:
            self.client.set_terminated(self.run_id, status=status)
