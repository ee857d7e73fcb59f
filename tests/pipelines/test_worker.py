"""Training jobs end to end with real processes: an MLflow tracking server, the API
(``convserve serve``), one or two ``convserve worker`` processes, and the queue on SQLite and
on this machine's Redis."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import TINY
from tests.servers import ENDED, uvicorn_server, wait_for_job, wait_for_prediction, worker_process
from tests.waiting import limit, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
TOKEN = "job-token-" + uuid.uuid4().hex[:8]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _env(mlflow_url: str, tmp: Path, redis: bool, model: str) -> dict[str, str]:
    env = {
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_API_TOKEN": TOKEN,
        "CONVSERVE_MODEL_URI": f"models:/{model}@champion",
        # short enough that a lost worker is noticed in seconds, long enough that the polls
        # (each a request to the tracking server) cost little; a busy machine's late
        # heartbeat is not a lost worker
        "CONVSERVE_POLL_INTERVAL": "1",
        "CONVSERVE_CACHE_DIR": str(tmp / "cache"),
        "CONVSERVE_HEARTBEAT_INTERVAL": "1",
        "CONVSERVE_WORKER_LOST_AFTER": str(round(limit(6))),
        "CONVSERVE_REAPER_INTERVAL": "2",
        "CONVSERVE_CANCEL_CHECK_INTERVAL": "0.5",
        "CONVSERVE_QUEUE_NAME": f"q-{uuid.uuid4().hex[:8]}",
        "CONVSERVE_QUEUE_PATH": str(tmp / "queue.db"),
    }
    if redis:
        env["REDIS_URL"] = "redis://127.0.0.1:6379/0"
    else:
        os.environ.pop("REDIS_URL", None)
    return env


def _job(experiment: str, model: str, **changes) -> dict:
    train = {**TINY, "tracking": {"experiment": experiment}}
    train["optim"] = {**TINY["optim"], **changes.pop("optim", {})}
    return {"train": train, "model_name": model, **changes}


def _progress(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()["progress"]


def _log_says(path: Path, text: str, timeout: float = 60) -> None:
    wait_until(lambda: text in path.read_text(errors="replace"), timeout, f"{path.name}: {text!r}")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("redis", [False, True], ids=["sqlite-queue", "redis-queue"])
def test_job_trains_registers_promotes_and_is_served(mlflow_url, tmp_path, redis):
    model = f"jobs-{uuid.uuid4().hex[:6]}"
    experiment = f"jobs-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp_path, redis, model)
    with uvicorn_server(env, tmp_path) as url, worker_process(env, tmp_path):
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/predict", files={"file": ("x.png", _png())}).status_code == 503
            r = http.post("/jobs", json=_job(experiment, model), headers=AUTH)
            assert r.status_code == 202, r.text
            job = r.json()
            assert job["status"] == "scheduled" and r.headers["location"].endswith(job["id"])
            done = wait_for_job(http, job["id"], {"succeeded", "failed"})
            assert done["status"] == "succeeded", done
            assert done["registered_version"] == "1" and done["promoted"] is True
            assert done["metrics"]["val_accuracy"] > 0.3 and done["diagnosis"]["verdict"]
            assert done["progress"]["epoch"] == 1
            r = wait_for_prediction(http, _png())
            assert r.json()["model"]["version"] == "1"
            assert r.json()["model"]["run_id"] == job["id"]
            listed = http.get("/jobs", params={"status": "succeeded"}).json()["jobs"]
            assert job["id"] in [j["id"] for j in listed]
            # the diagnostics over time, from the run's metrics in MLflow
            diag = http.get(f"/jobs/{job['id']}/diagnostics").json()
            assert diag["layers"] == ["block1.conv", "head.out"]
            assert diag["diagnosis"] == done["diagnosis"]
            grad = diag["statistics"]["grad_std"]["block1.conv"]
            assert grad["steps"][0] == 1 and len(grad["steps"]) == len(grad["values"]) >= 2
            assert diag["ratios"]["grad_ratio"]["values"][0] == 1.0  # one hidden layer
            assert http.get(f"/jobs/{'0' * 32}/diagnostics").status_code == 404
    run = MlflowClient(mlflow_url).get_run(job["id"])
    assert run.info.status == "FINISHED" and run.data.params["init.name"] == "he_normal"
    assert TOKEN not in str(run.data)  # nothing about the token reaches MLflow
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert TOKEN not in logs


def test_a_job_trains_on_two_data_parallel_processes(mlflow_url, tmp_path):
    model = f"ddp-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp_path, False, model)
    with uvicorn_server(env, tmp_path) as url, worker_process(env, tmp_path):
        with httpx.Client(base_url=url, timeout=30) as http:
            body = _job("ddp-jobs", model, optim={"epochs": 2}, nproc_per_node=2)
            r = http.post("/jobs", json=body, headers=AUTH)
            assert r.status_code == 202, r.text
            done = wait_for_job(http, r.json()["id"], {"succeeded", "failed"}, timeout=180)
            assert done["status"] == "succeeded", done
            assert done["registered_version"] == "1" and done["progress"]["epoch"] == 2
            odd = _job("ddp-jobs", model, nproc_per_node=3)  # 32 images a step
            r = http.post("/jobs", json=odd, headers=AUTH)
            assert r.status_code == 422 and "split evenly" in r.text
    client = MlflowClient(mlflow_url)
    run = client.get_run(done["id"])
    assert run.info.status == "FINISHED" and run.data.metrics["val_accuracy"] > 0.3
    assert [m.step for m in client.get_metric_history(done["id"], "epoch")] != []
    logs = (tmp_path / "worker.log").read_text()
    assert "training on 2 processes" in logs


def test_invalid_body_auth_and_queue_limit(mlflow_url, tmp_path):
    env = {**_env(mlflow_url, tmp_path, False, "auth-model"), "CONVSERVE_MAX_QUEUED_JOBS": "1"}
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url) as http:
        before = len(http.get("/jobs").json()["jobs"])
        body = _job("auth", "auth-model")
        assert http.post("/jobs", json=body).status_code == 401
        assert (
            http.post("/jobs", json=body, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        bad = {**body, "train": {**body["train"], "model": {"activation": "swish"}}}
        r = http.post("/jobs", json=bad, headers=AUTH)
        assert r.status_code == 422 and "activation" in r.text
        r = http.post("/jobs", json={"model_name": "x"}, headers=AUTH)
        assert r.status_code == 422 and "exactly one of" in r.text
        assert len(http.get("/jobs").json()["jobs"]) == before  # nothing was queued
        assert http.delete("/jobs/abc").status_code == 401
        r = http.get("/jobs", params={"page_token": "abc"})  # not a token MLflow handed out
        assert r.status_code == 422 and "page_token" in r.json()["detail"]
        assert http.get("/jobs/no-such-job").status_code == 404
        # no worker runs here: the second waiting job is over the limit
        assert http.post("/jobs", json=body, headers=AUTH).status_code == 202
        r = http.post("/jobs", json=body, headers=AUTH)
        assert r.status_code == 429 and "CONVSERVE_MAX_QUEUED_JOBS" in r.json()["detail"]
        assert len(http.get("/jobs").json()["jobs"]) == before + 1
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert TOKEN not in logs


def test_cancel_queued_and_running_jobs(mlflow_url, tmp_path):
    env = _env(mlflow_url, tmp_path, False, "cancel-model")
    slow = {"epochs": 200, "lr": 0.001}
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        running = http.post(
            "/jobs", json=_job("cancel", "cancel-model", optim=slow), headers=AUTH
        ).json()
        queued = http.post("/jobs", json=_job("cancel", "cancel-model"), headers=AUTH).json()
        assert http.delete(f"/jobs/{queued['id']}", headers=AUTH).json()["status"] == "cancelled"
        with worker_process(env, tmp_path):
            wait_for_job(http, running["id"], {"running"})
            wait_until(lambda: _progress(http, running["id"]).get("step"), 60, "a step trained")
            start = time.monotonic()
            http.delete(f"/jobs/{running['id']}", headers=AUTH)
            job = wait_for_job(http, running["id"], timeout=20)
            assert job["status"] == "cancelled" and time.monotonic() - start < limit(10)
            # the worker takes the queued job next, and does not start it
            _log_says(tmp_path / "worker.log", f"job {queued['id']} is cancelled: not started")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(queued["id"]).info.status == "KILLED"
    assert "job.started" not in client.get_run(queued["id"]).data.metrics  # never started
    assert client.get_run(running["id"]).info.status == "KILLED"
    assert list(tmp_path.glob(f"runs/{running['id']}/last.pt"))  # kept its checkpoint


def test_killed_worker_fails_its_job_when_no_retry_is_left(mlflow_url, tmp_path):
    env = {**_env(mlflow_url, tmp_path, True, "kill-model"), "CONVSERVE_JOB_RETRIES": "0"}
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        long = http.post(
            "/jobs",
            json=_job("kill", "kill-model", optim={"epochs": 200}, register=False),
            headers=AUTH,
        ).json()
        nxt = http.post(
            "/jobs", json=_job("kill", "kill-model", register=False), headers=AUTH
        ).json()
        with worker_process(env, tmp_path, "doomed") as doomed:
            wait_for_job(http, long["id"], {"running"})
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
        start = time.monotonic()
        with worker_process(env, tmp_path, "second"):
            job = wait_for_job(http, long["id"], {"failed"}, timeout=30)
            assert "worker lost" in job["error"] and time.monotonic() - start < limit(15)
            assert wait_for_job(http, nxt["id"], {"succeeded"})["status"] == "succeeded"


def test_a_killed_workers_job_resumes_from_its_checkpoint_and_is_published_once(
    mlflow_url, tmp_path
):
    model = f"resume-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp_path, True, model)  # one retry by default
    client = MlflowClient(mlflow_url)
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        job = http.post("/jobs", json=_job("resume", model, optim={"epochs": 6}), headers=AUTH)
        job_id = job.json()["id"]
        with worker_process(env, tmp_path, "doomed") as doomed:
            wait_until(lambda: (_progress(http, job_id).get("epoch") or 0) >= 2, 120, "epoch 2")
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
        with worker_process(env, tmp_path, "second"):
            done = wait_for_job(http, job_id, timeout=120)
    assert done["status"] == "succeeded", done
    assert [a["attempt"] for a in done["attempts"]] == [1, 2]
    assert "worker lost" in done["attempts"][0]["ended"] and done["attempts"][1]["ended"] is None
    tags = client.get_run(job_id).data.tags
    assert tags["convserve.attempt"] == "2" and tags["convserve.resumed_from"]
    (lost,) = json.loads(tags["convserve.attempts"])
    assert lost["attempt"] == 1 and "worker lost" in lost["ended"]
    epochs = [m.value for m in client.get_metric_history(job_id, "epoch")]
    assert epochs[-1] == 6 and 1.0 not in epochs[epochs.index(2.0) + 1 :]  # resumed, not redone
    assert len(client.search_model_versions(f"name = '{model}'")) == 1  # published once


def test_a_stopped_worker_that_resumes_writes_nothing(mlflow_url, tmp_path):
    """SIGSTOP past the lost-worker limit, then SIGCONT: the job stays failed (no retry left),
    and the worker that wakes up neither resurrects it nor registers a version. The one write
    its training may have had under way when it was stopped (its lease checked, its request
    not yet sent) can still land; nothing after it does."""
    model = f"stopped-{uuid.uuid4().hex[:6]}"
    env = {**_env(mlflow_url, tmp_path, True, model), "CONVSERVE_JOB_RETRIES": "0"}
    client = MlflowClient(mlflow_url)
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        job_id = http.post(
            "/jobs", json=_job("stopped", model, optim={"epochs": 3}), headers=AUTH
        ).json()["id"]
        with worker_process(env, tmp_path, "sleeper") as sleeper:
            wait_for_job(http, job_id, {"running"})
            wait_until(lambda: _progress(http, job_id).get("step"), 60, "a step trained")
            os.killpg(sleeper.pid, signal.SIGSTOP)
            with worker_process(env, tmp_path, "reaper"):  # its reaper takes the job
                failed = wait_for_job(http, job_id, {"failed"}, timeout=30)
                assert "worker lost" in failed["error"]
                before = _histories(client, job_id)
                os.killpg(sleeper.pid, signal.SIGCONT)
                # it notices at its next lease check and ends the job, writing nothing
                _log_says(tmp_path / "sleeper.log", " executed in ", 60)
            assert sleeper.poll() is None  # it lives on, and takes other jobs
    after = client.get_run(job_id)
    assert after.info.status == "FAILED" and after.data.tags["convserve.job_status"] == "failed"
    late = {
        key: points[len(before.get(key, [])) :]
        for key, points in _histories(client, job_id).items()
    }
    late = {key: points for key, points in late.items() if points}
    # at most the one batch under way: one point a metric, all of one step
    assert all(len(points) == 1 for points in late.values()), late
    assert len({points[0].step for points in late.values()}) <= 1, late
    assert client.search_model_versions(f"name = '{model}'") == []
    log = (tmp_path / "sleeper.log").read_text()
    assert "lease lost" in log


def _histories(client: MlflowClient, run_id: str) -> dict[str, list]:
    """Every point of every metric of the run, by key, in the order written."""
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
        for key in keys
    }


def test_a_cancel_after_the_last_step_publishes_nothing(mlflow_url, tmp_path):
    """The cancel arrives once training is done, before the export: nothing is registered."""
    model = f"late-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp_path, True, model)
    client = MlflowClient(mlflow_url)
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        job_id = http.post(
            "/jobs", json=_job("late", model, optim={"max_steps": 5}), headers=AUTH
        ).json()["id"]
        # the cancel is on the run before any worker starts the job: it must still train
        # (a queued job's cancel would stop it from starting), so ask once it runs
        with worker_process(env, tmp_path):
            wait_until(lambda: _progress(http, job_id).get("step") == 5, 60, "step 5", 0.02)
            http.delete(f"/jobs/{job_id}", headers=AUTH)
            done = wait_for_job(http, job_id, timeout=60)
    if done["status"] == "succeeded":  # published before the cancel arrived: it is a race
        assert done["registered_version"] == "1"
        pytest.skip("the job was published before the cancel reached the run")
    assert done["status"] == "cancelled"
    assert client.search_model_versions(f"name = '{model}'") == []


def test_twenty_jobs_two_workers_one_killed_none_lost_none_twice(mlflow_url, tmp_path):
    """20 registering jobs queued while the API restarts, two workers, one killed while it
    holds a job and replaced, as a supervisor would: every job ends succeeded exactly once,
    the lost one on its second attempt, and each registers exactly one version."""
    model = f"bulk-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp_path, True, model)
    ids = []
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(20):
            body = _job("bulk", model, optim={"max_steps": 30}, promote=False)
            r = http.post("/jobs", json=body, headers=AUTH)
            assert r.status_code == 202
            ids.append(r.json()["id"])
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    # the API goes away; the queue and the jobs do not
    with (
        worker_process(env, tmp_path, "w1") as w1,
        worker_process(env, tmp_path, "w2"),
        uvicorn_server(env, tmp_path) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):

        def held_by_w1() -> str | None:
            for job_id in ids:
                run = client.get_run(job_id)
                worker = run.data.tags.get("convserve.worker", "")
                if run.info.status == "RUNNING" and f":{w1.pid}:" in worker:
                    return job_id
            return None

        wait_until(held_by_w1, 120, "w1 holds a running job", 0)  # kill w1 while it does
        os.killpg(w1.pid, signal.SIGKILL)
        w1.wait()
        with worker_process(env, tmp_path, "w3"):
            for job_id in ids:
                job = wait_for_job(http, job_id, {"succeeded", "failed"}, 240)
                assert job["status"] == "succeeded", job
    # the job w1 held when it died (it may have finished the one seen above just before)
    lost = [i for i in ids if "convserve.attempts" in client.get_run(i).data.tags]
    assert len(lost) == 1
    held = lost[0]
    starts = {i: len(client.get_metric_history(i, "job.started")) for i in ids}
    assert starts[held] == 2 and all(n == 1 for i, n in starts.items() if i != held)
    assert client.get_run(held).data.tags["convserve.attempt"] == "2"
    versions = client.search_model_versions(f"name = '{model}'")
    assert sorted(v.run_id for v in versions) == sorted(ids)  # one version per job
    (lost,) = json.loads(client.get_run(held).data.tags["convserve.attempts"])
    assert f":{w1.pid}:" in lost["worker"] and "worker lost" in lost["ended"]


@pytest.mark.parametrize("decision", [None, True, False], ids=["no-decision", "won", "lost"])
def test_a_registered_job_says_whether_it_was_promoted(sqlite_uri, tmp_path, decision):
    from convserve.pipelines.registry import Decision, Published
    from convserve.pipelines.tasks import _record_publication
    from convserve.training.export import ParityReport

    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment("promoted")).info.run_id
    published = Published(tmp_path / "model.onnx", ParityReport({}, [1], 18), run_id, "m", "3")
    if decision is not None:
        alias = "champion" if decision else "challenger"
        published.decision = Decision(decision, alias, "measured", 0.9, 0.8, None)
    _record_publication(client, run_id, published)
    tags = client.get_run(run_id).data.tags
    assert tags["convserve.registered_version"] == "3"
    assert tags["convserve.promoted"] == ("true" if decision else "false")


def _sweep_env(mlflow_url: str, tmp: Path, database: str) -> tuple[dict[str, str], str]:
    model = f"study-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp, True, model)
    env["CONVSERVE_STUDY_STORAGE"] = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    return env, model


def _sweep_body(experiment: str, model: str, grid: dict, epochs: int, **sweep) -> dict:
    base = {**TINY, "tracking": {"experiment": experiment}}
    base["optim"] = {**TINY["optim"], "epochs": epochs}
    return {"sweep": {"base": base, "grid": grid, **sweep}, "model_name": model}


def _children(client: MlflowClient, experiment: str, parent: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def _study(env: dict[str, str], parent: str):
    import optuna

    return optuna.load_study(
        study_name=f"convserve-{parent}", storage=env["CONVSERVE_STUDY_STORAGE"]
    )


def test_a_grid_on_two_workers_runs_each_point_once_and_publishes_once(
    mlflow_url, tmp_path, postgres_database
):
    """A 6-point grid as an Optuna study on PostgreSQL, its trials on Redis, two workers;
    submitted and followed by `convserve sweep --queue`."""
    import subprocess
    import sys

    env, model = _sweep_env(mlflow_url, tmp_path, postgres_database)
    experiment = f"study-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(mlflow_url)
    grid = {"seed": [0, 1, 2], "optim.lr": [0.01, 0.02]}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(_sweep_body(experiment, model, grid, 1, parallelism=2)["sweep"]))
    cli = str(Path(sys.executable).parent / "convserve")
    with (
        uvicorn_server(env, tmp_path) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        worker_process(env, tmp_path, "w1") as w1,
        worker_process(env, tmp_path, "w2") as w2,
    ):
        out = subprocess.run(
            [cli, "sweep", "--queue", "--config", str(path), "--model-name", model],
            env={**os.environ, **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=limit(240),
        )
        assert out.returncode == 0, out.stdout + out.stderr
        job_id = out.stdout.split("sweep job ", 1)[1].split(":", 1)[0]
        done = http.get(f"/jobs/{job_id}").json()
    assert "6 trials, 2 at a time" in out.stdout
    assert "trials: 6 finished, 0 pruned, 0 failed, 0 running, 0 waiting" in out.stdout
    assert f"registered {model} version 1 (champion)" in out.stdout
    assert done["status"] == "succeeded", done
    assert done["progress"]["trials"] == {
        "trials": 6,
        "waiting": 0,
        "running": 0,
        "finished": 6,
        "pruned": 0,
        "failed": 0,
    }
    runs = _children(client, experiment, job_id)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    points = sorted(r.data.tags["convserve.point"] for r in runs)
    assert points == sorted(
        json.dumps({"optim.lr": lr, "seed": seed}, sort_keys=True)
        for seed in (0, 1, 2)
        for lr in (0.01, 0.02)
    )
    takers = {r.data.tags["convserve.worker"].split(":")[1] for r in runs}
    assert takers == {str(w1.pid), str(w2.pid)}  # both workers took trials
    study = _study(env, job_id)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    assert {t.user_attrs["run_id"] for t in study.trials} == {r.info.run_id for r in runs}
    (version,) = client.search_model_versions(f"name = '{model}'")  # published once
    best = max(r.data.metrics["best_val_accuracy"] for r in runs)
    published = client.get_run(version.run_id)
    assert published.data.metrics["best_val_accuracy"] == best  # the best (or tied with it)
    assert version.run_id in {r.info.run_id for r in runs}
    assert done["registered_version"] == version.version
    parent = client.get_run(job_id)
    assert parent.data.tags["convserve.best_run_id"] == version.run_id
    summary = Path(client.download_artifacts(job_id, "summary/sweep.csv", str(tmp_path)))
    assert len(summary.read_text().strip().splitlines()) == 1 + 6
    # one parent run: the job; the trials are its children only
    assert (
        len(client.search_runs([parent.info.experiment_id], "tags.`convserve.kind` = 'job'")) == 1
    )


def test_a_worker_killed_mid_trial_leaves_the_study_consistent(
    mlflow_url, tmp_path, postgres_database
):
    """The killed worker's trial is failed once its heartbeat is stale, its child run says
    "worker lost", a retry with the same point finishes on the other worker, and the best
    trial is published once."""
    env, model = _sweep_env(mlflow_url, tmp_path, postgres_database)
    experiment = f"study-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(mlflow_url)
    body = _sweep_body(experiment, model, {"seed": [0, 1, 2]}, 4, parallelism=2)
    with (
        uvicorn_server(env, tmp_path) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        worker_process(env, tmp_path, "doomed") as doomed,
    ):
        job_id = http.post("/jobs", json=body, headers=AUTH).json()["id"]

        def held_by_doomed():  # type: ignore[no-untyped-def]
            for run in _children(client, experiment, job_id):
                worker = run.data.tags.get("convserve.worker", "")
                if run.info.status == "RUNNING" and f":{doomed.pid}:" in worker:
                    return run
            return None

        held = wait_until(held_by_doomed, 120, "the doomed worker holds a trial")
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        with worker_process(env, tmp_path, "second"):
            done = wait_for_job(http, job_id, timeout=240)
    assert done["status"] == "succeeded", done
    lost = client.get_run(held.info.run_id)
    assert lost.info.status == "FAILED" and "worker lost" in lost.data.tags["convserve.error"]
    runs = _children(client, experiment, job_id)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(json.loads(r.data.tags["convserve.point"])["seed"] for r in finished) == [0, 1, 2]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    study = _study(env, job_id)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1, states
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    # the trial records its run just after creating it; a worker killed in between leaves the
    # run to be found by the trial's number (study._trial_runs), as the reaper found it
    if failed.user_attrs.get("run_id"):
        assert failed.user_attrs["run_id"] == held.info.run_id
    else:
        assert held.data.tags["convserve.trial"] == str(failed.number)
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.params == failed.params and retry.state.name == "COMPLETE"
    assert done["progress"]["trials"]["failed"] == 1 and done["progress"]["trials"]["trials"] == 3
    assert len(client.search_model_versions(f"name = '{model}'")) == 1


def test_cancelling_a_sweep_stops_its_trials_and_publishes_nothing(
    mlflow_url, tmp_path, postgres_database
):
    env, model = _sweep_env(mlflow_url, tmp_path, postgres_database)
    experiment = f"study-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(mlflow_url)
    body = _sweep_body(experiment, model, {"seed": [0, 1, 2, 3, 4]}, 3)
    with (
        uvicorn_server(env, tmp_path) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        worker_process(env, tmp_path),
    ):
        job_id = http.post("/jobs", json=body, headers=AUTH).json()["id"]
        wait_until(
            lambda: any(r.info.status == "FINISHED" for r in _children(client, experiment, job_id)),
            120,
            "a trial finished",
            0.2,
        )
        assert http.delete(f"/jobs/{job_id}", headers=AUTH).status_code in (200, 202)
        done = wait_for_job(http, job_id, timeout=120)
    assert done["status"] == "cancelled", done
    runs = _children(client, experiment, job_id)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert len([r for r in runs if r.info.status == "FINISHED"]) < 5
    study = _study(env, job_id)
    assert not [t for t in study.trials if t.state.name in ("WAITING", "RUNNING")]
    cancelled = [t for t in study.trials if t.user_attrs.get("status") == "cancelled"]
    assert cancelled
    assert client.search_model_versions(f"name = '{model}'") == []


def _tree(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [pid, *(p for k in kids for p in _tree(int(k)))]


def _holds_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # gone meanwhile
        return False


def test_an_idle_worker_holds_no_torch(mlflow_url, tmp_path):
    """The worker process never imports torch: each job runs in its job process, which exits
    once idle (CONVSERVE_WORKER_IDLE_EXIT) and is started again by the next task."""
    model = f"idle-{uuid.uuid4().hex[:6]}"
    env = {**_env(mlflow_url, tmp_path, False, model), "CONVSERVE_WORKER_IDLE_EXIT": "1"}
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        with worker_process(env, tmp_path) as worker:
            _log_says(tmp_path / "worker.log", "convserve worker: queue")
            assert _tree(worker.pid) == [worker.pid] and not _holds_torch(worker.pid)
            for n in (1, 2):
                job_id = http.post("/jobs", json=_job("idle", model), headers=AUTH).json()["id"]
                running = wait_for_job(http, job_id, {"running", "succeeded"})
                assert running["status"] in ("running", "succeeded")
                assert wait_for_job(http, job_id, ENDED)["status"] == "succeeded"
                wait_until(lambda: _tree(worker.pid) == [worker.pid], 60, "the job process exited")
                assert not any(_holds_torch(p) for p in _tree(worker.pid))
                log = (tmp_path / "worker.log").read_text()
                assert log.count("job process") >= 2 * n  # started, then idle and exiting
    assert log.count("1 task run, idle: exiting") == 2


def test_ctrl_c_lets_the_running_job_finish_and_takes_no_other(mlflow_url, tmp_path):
    """SIGINT to the worker: its job process finishes the job it runs, takes no other, and
    the worker exits with its liveness file gone."""
    model = f"sigint-{uuid.uuid4().hex[:6]}"
    alive = tmp_path / "worker.alive"
    env = {**_env(mlflow_url, tmp_path, False, model), "CONVSERVE_WORKER_LIVENESS_FILE": str(alive)}
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = _job("sigint", model, optim={"epochs": 3})
        first, second = (http.post("/jobs", json=body, headers=AUTH).json()["id"] for _ in "12")
        with worker_process(env, tmp_path) as worker:
            wait_until(lambda: _progress(http, first).get("step"), 60, "a step trained")
            worker.send_signal(signal.SIGINT)
            assert worker.wait(timeout=limit(120)) == 0
        assert wait_for_job(http, first, ENDED)["status"] == "succeeded"
        assert http.get(f"/jobs/{second}").json()["status"] == "scheduled"
    assert not alive.exists()
    assert "1 task run, stopped: exiting" in (tmp_path / "worker.log").read_text()


def test_a_second_ctrl_c_stops_the_running_job_at_once(mlflow_url, tmp_path):
    model = f"sigint2-{uuid.uuid4().hex[:6]}"
    env = _env(mlflow_url, tmp_path, False, model)
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = _job("sigint2", model, optim={"epochs": 50})
        job = http.post("/jobs", json=body, headers=AUTH).json()["id"]
        with worker_process(env, tmp_path) as worker:
            wait_until(lambda: _progress(http, job).get("step"), 60, "a step trained")
            children = _tree(worker.pid)[1:]
            assert children, "the job runs in the worker's job process"
            worker.send_signal(signal.SIGINT)
            _log_says(tmp_path / "worker.log", "Ctrl-C again to stop it now")
            worker.send_signal(signal.SIGINT)
            assert worker.wait(timeout=limit(30)) == 0
            assert not any(Path(f"/proc/{p}").exists() for p in children)
        # stopped at its next step and handed back, to go on where it stopped
        handed = http.get(f"/jobs/{job}").json()
        assert handed["status"] == "scheduled", handed
        assert "handed back by its draining worker" in handed["attempts"][0]["ended"]
    # no worker of this test is left to take it: cancelled here
    from convserve.jobs import fail

    fail(MlflowClient(mlflow_url), job, "not taken: stopped by the test")


@pytest.mark.parametrize(
    ("setting", "unusable"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:{port}/0"}, "the queue, Redis"),
        ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "MLflow, http://127.0.0.1"),
        (
            {"CONVSERVE_STUDY_STORAGE": "postgresql://postgres:pw@127.0.0.1:{port}/optuna"},
            "the study storage, postgresql+psycopg2://postgres:***@127.0.0.1",
        ),
    ],
)
def test_a_worker_with_an_unusable_backend_exits_2_saying_which(
    mlflow_url, tmp_path, setting, unusable
):
    import subprocess
    import sys

    from tests.servers import free_port

    env = {**os.environ, **_env(mlflow_url, tmp_path, False, "unused")}
    env.update({k: v.format(port=free_port()) for k, v in setting.items()})
    cli = str(Path(sys.executable).parent / "convserve")
    done = subprocess.run(
        [cli, "worker"], env=env, capture_output=True, text=True, timeout=limit(120), check=False
    )
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join((done.stdout + done.stderr).split())
    assert "the worker cannot start" in said and unusable in said, said


def test_a_plain_postgresql_url_opens_the_study_storage(postgres_database):
    """``postgresql://`` as PostgreSQL writes it: SQLAlchemy would look for psycopg 3."""
    import optuna

    from convserve.jobs import JobSettings
    from convserve.pipelines.study import open_storage, storage_url

    settings = JobSettings(study_storage=f"postgresql://postgres@127.0.0.1/{postgres_database}")
    assert storage_url(settings).startswith("postgresql+psycopg2://")
    study = optuna.create_study(storage=open_storage(settings), study_name="plain")
    assert study.study_name == "plain"
    assert optuna.load_study(study_name="plain", storage=storage_url(settings)).trials == []


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_workers_starting_together_on_a_new_study_database_all_start(kind, request, tmp_path):
    """Four processes open the study storage of one new database (PostgreSQL, or a SQLite
    file as a local queue's workers do) at once: all of them get it (the ones that lose the
    race to create Optuna's tables try again)."""
    import subprocess
    import sys

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'studies.db'}"
    else:
        url = f"postgresql://postgres@127.0.0.1/{request.getfixturevalue('postgres_database')}"
    code = (
        "from convserve.jobs import JobSettings\n"
        "from convserve.pipelines.study import open_storage\n"
        f"open_storage(JobSettings(study_storage={url!r}))\n"
        "print('opened')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=limit(120))[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4 and outs == ["opened\n"] * 4
