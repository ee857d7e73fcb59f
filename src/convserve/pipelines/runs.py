"""A job's request as a worker runs it: read from the job's run once per process, tracked on
the worker's MLflow server and written under the worker's runs folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from convserve.jobs import REQUEST_ARTIFACT, JobRequest
from convserve.training.config import SweepConfig, TrainConfig

_requests: dict[str, JobRequest] = {}  # a sweep's request, read once per worker process


def read_request(client: Any, run_id: str, cache: bool = False) -> JobRequest:
    """The job's request from its run (kept for the process when ``cache``: a sweep's trials
    read it once)."""
    if cache and run_id in _requests:
        return _requests[run_id]
    with open(client.download_artifacts(run_id, REQUEST_ARTIFACT)) as f:
        request = JobRequest.model_validate_json(f.read())
    if cache:
        _requests[run_id] = request
    return request


def tracked(cfg: TrainConfig, tracking_uri: str, runs_dir: str) -> TrainConfig:
    """``cfg`` tracked on the worker's MLflow server and written under the worker's runs
    folder, whatever the request said."""
    tracking = cfg.tracking.model_copy(
        update={"enabled": True, "tracking_uri": tracking_uri, "output_dir": runs_dir}
    )
    return cfg.model_copy(update={"tracking": tracking})


def tracked_sweep(request: JobRequest, tracking_uri: str, runs_dir: str) -> SweepConfig:
    assert request.sweep is not None
    return request.sweep.model_copy(
        update={"base": tracked(request.sweep.base, tracking_uri, runs_dir)}
    )


def last_checkpoint(client: Any, run_id: str, runs_dir: str) -> Path | None:
    """The ``last.pt`` an earlier attempt left in the run's artifacts (a job or trial handed
    back or lost), downloaded under ``runs_dir``; None when it left none: start over."""
    folder = Path(runs_dir) / run_id / "resume"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, "checkpoints/last.pt", str(folder)))
    except Exception as err:  # stopped before its first checkpoint: nothing to resume from
        logging.getLogger(__name__).info(
            "run %s: no checkpoint to resume from (%s); starting over", run_id, err
        )
        return None
