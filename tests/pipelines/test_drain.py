"""A rolling restart of the workers, as a Deployment does it: each worker is SIGTERMed in turn
(to its own process, as ``docker stop`` and the kubelet send it) and replaced, while train
jobs and a sweep's trials run. Real processes: an MLflow server, the API, workers on this
machine's Redis and PostgreSQL."""

from __future__ import annotations

import json
import signal
import time
import uuid
from contextlib import ExitStack

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.pipelines.test_worker import AUTH, _env, _job, _study, _sweep_body
from tests.servers import uvicorn_server, wait_for_job, worker_process
from tests.waiting import limit, wait_until

DRAIN_SECONDS = 120

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _trains_on(client: MlflowClient, experiment: str, pid: int, trial: bool) -> bool:
    """Whether the worker ``pid`` trains a sweep's ``trial``, or else a job (past its first
    steps, well before its last)."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if f":{pid}:" not in tags.get("convserve.worker", ""):
            continue
        if ("mlflow.parentRunId" in tags) != trial:
            continue
        if trial:
            return True
        progress = json.loads(tags.get("convserve.progress", "{}"))
        if 0 < progress.get("step", 0) < 0.7 * progress.get("total", 0):  # well before its end
            return True
    return False


def test_a_rolling_restart_of_the_workers_loses_no_work(mlflow_url, tmp_path, postgres_database):
    """4 train jobs and a 6-trial sweep on two workers; the first worker is SIGTERMed while
    it trains a job, the second while it trains a trial, and each is replaced. A lost worker
    would be noticed only after 10 minutes here, so everything that finishes in time was
    handed back by the drain, not taken over. Every job and trial finishes once, none fails,
    each drained one resumes at the step it stopped at (no epoch or step is trained twice)
    and each job registers one version."""
    model = f"drain-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp_path, True, model)
    env["CONVSERVE_WORKER_LOST_AFTER"] = "600"
    # room for the hand-back on a machine busy with the rest of the suite; a worker exits
    # within it (and 5 s for its liveness thread)
    env["CONVSERVE_DRAIN_SECONDS"] = str(DRAIN_SECONDS)
    env["CONVSERVE_STUDY_STORAGE"] = (
        f"postgresql+psycopg2://postgres@127.0.0.1:5432/{postgres_database}"
    )
    experiment = f"drain-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(mlflow_url)
    started = time.monotonic()
    with (
        uvicorn_server(env, tmp_path) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        ExitStack() as workers,
    ):
        bodies = [_job(experiment, model, optim={"epochs": 6}) for _ in range(4)]
        for seed, job in enumerate(bodies):
            job["train"]["seed"] = seed
        jobs = [http.post("/jobs", json=job, headers=AUTH).json()["id"] for job in bodies]
        grid = {"seed": [0, 1, 2], "optim.lr": [0.01, 0.02]}
        body = _sweep_body(experiment, model, grid, 3, parallelism=2)
        sweep = http.post("/jobs", json=body, headers=AUTH).json()["id"]
        first = [workers.enter_context(worker_process(env, tmp_path, f"w{i}")) for i in (1, 2)]
        drains = []
        for n, old, trial in zip((3, 4), first, (False, True), strict=True):
            wait_until(
                lambda old=old, trial=trial: _trains_on(client, experiment, old.pid, trial),
                120,
                f"w{n - 2} trains a {'trial' if trial else 'job'}",
                0.2,
            )
            old.send_signal(signal.SIGTERM)
            asked = time.monotonic()
            assert old.wait(timeout=limit(DRAIN_SECONDS + 15)) == 0
            drains.append(time.monotonic() - asked)
            workers.enter_context(worker_process(env, tmp_path, f"w{n}"))  # the replacement
        done = [wait_for_job(http, job_id, timeout=240) for job_id in [*jobs, sweep]]
    wall = time.monotonic() - started
    print(f"rolling restart: wall {wall:.1f} s; workers drained in {drains} s")
    assert [d["status"] for d in done] == ["succeeded"] * 5, done
    handed_back = 0
    for job_id in jobs:
        run = client.get_run(job_id)
        tags = run.data.tags
        attempts = json.loads(tags.get("convserve.attempts", "[]"))
        assert all("handed back by its draining worker" in a["ended"] for a in attempts)
        assert tags.get("convserve.drains", "0") == str(len(attempts))
        handed_back += len(attempts)
        epochs = [m.value for m in client.get_metric_history(job_id, "epoch")]
        assert sorted(epochs) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], epochs  # none trained twice
        steps = [m.step for m in client.get_metric_history(job_id, "epoch")]
        assert steps == sorted(steps) and steps[-1] == steps[0] * 6  # the exact step count
        versions = client.search_model_versions(f"name = '{model}' and run_id = '{job_id}'")
        assert len(versions) == 1
    study = _study(env, sweep)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    runs = [client.get_run(t.user_attrs["run_id"]) for t in study.trials]
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")]
        assert sorted(epochs) == [1.0, 2.0, 3.0], epochs
    resumed_trials = sum(r.data.tags.get("convserve.attempt") != "1" for r in runs)
    assert handed_back >= 1 and resumed_trials >= 1, "each worker was stopped while it trained"
    print(f"handed back: {handed_back} job attempts, {resumed_trials} trials")
