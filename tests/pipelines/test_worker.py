"""Training jobs end to end with real processes: an MLflow tracking server, the API
(``convserve serve``), one or two ``convserve worker`` processes, and the queue on SQLite and
on this machine's Redis."""

from __future__ import annotations

import io
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
from tests.servers import uvicorn_server, worker_process

pytestmark = pytest.mark.slow
TOKEN = "job-token-" + uuid.uuid4().hex[:8]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _env(mlflow_url: str, tmp: Path, redis: bool, model: str) -> dict[str, str]:
    env = {
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_API_TOKEN": TOKEN,
        "CONVSERVE_MODEL_URI": f"models:/{model}@champion",
        "CONVSERVE_POLL_INTERVAL": "0.5",
        "CONVSERVE_CACHE_DIR": str(tmp / "cache"),
        "CONVSERVE_HEARTBEAT_INTERVAL": "0.5",
        "CONVSERVE_WORKER_LOST_AFTER": "4",
        "CONVSERVE_REAPER_INTERVAL": "1",
        "CONVSERVE_CANCEL_CHECK_INTERVAL": "0.3",
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


def _wait(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stayed {job['status']}")


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
            done = _wait(http, job["id"], {"succeeded", "failed"})
            assert done["status"] == "succeeded", done
            assert done["registered_version"] == "1" and done["promoted"] is True
            assert done["metrics"]["val_accuracy"] > 0.3 and done["verdicts"]
            assert done["progress"]["epoch"] == 1
            end = time.monotonic() + 30
            while time.monotonic() < end:
                r = http.post("/predict", files={"file": ("x.png", _png())})
                if r.status_code == 200:
                    break
                time.sleep(0.3)
            assert r.status_code == 200 and r.json()["model"]["version"] == "1"
            assert r.json()["model"]["run_id"] == job["id"]
            listed = http.get("/jobs", params={"status": "succeeded"}).json()["jobs"]
            assert job["id"] in [j["id"] for j in listed]
    run = MlflowClient(mlflow_url).get_run(job["id"])
    assert run.info.status == "FINISHED" and run.data.params["init.name"] == "he_normal"
    assert TOKEN not in str(run.data)  # nothing about the token reaches MLflow
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert TOKEN not in logs


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
            _wait(http, running["id"], {"running"})
            time.sleep(1.0)
            start = time.monotonic()
            http.delete(f"/jobs/{running['id']}", headers=AUTH)
            job = _wait(http, running["id"], {"cancelled", "failed", "succeeded"}, timeout=20)
            assert job["status"] == "cancelled" and time.monotonic() - start < 10
            time.sleep(2.0)  # the worker has had time to take the queued one
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(queued["id"]).info.status == "KILLED"
    assert "job.started" not in client.get_run(queued["id"]).data.metrics  # never started
    assert client.get_run(running["id"]).info.status == "KILLED"
    assert list(tmp_path.glob(f"runs/{running['id']}/last.pt"))  # kept its checkpoint


def test_killed_worker_fails_its_job_and_the_next_job_runs(mlflow_url, tmp_path):
    env = _env(mlflow_url, tmp_path, True, "kill-model")
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
            _wait(http, long["id"], {"running"})
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
        start = time.monotonic()
        with worker_process(env, tmp_path, "second"):
            job = _wait(http, long["id"], {"failed"}, timeout=30)
            assert "worker lost" in job["error"] and time.monotonic() - start < 15
            assert _wait(http, nxt["id"], {"succeeded"})["status"] == "succeeded"


def test_twenty_jobs_two_workers_none_lost_none_twice_api_restart(mlflow_url, tmp_path):
    env = _env(mlflow_url, tmp_path, True, "bulk-model")
    ids = []
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(20):
            r = http.post(
                "/jobs",
                json=_job("bulk", "bulk-model", optim={"max_steps": 3}, register=False),
                headers=AUTH,
            )
            assert r.status_code == 202
            ids.append(r.json()["id"])
    # the API goes away; the queue and the jobs do not
    with (
        worker_process(env, tmp_path, "w1"),
        worker_process(env, tmp_path, "w2"),
        uvicorn_server(env, tmp_path) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        for job_id in ids:
            assert _wait(http, job_id, {"succeeded", "failed"}, 240)["status"] == "succeeded"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for job_id in ids:
        assert len(client.get_metric_history(job_id, "job.started")) == 1
    workers = {client.get_run(i).data.tags["convserve.worker"] for i in ids}
    assert len(workers) == 2  # both workers took jobs


@pytest.mark.parametrize("decision", [None, True, False], ids=["no-decision", "won", "lost"])
def test_a_registered_job_says_whether_it_was_promoted(sqlite_uri, tmp_path, decision):
    from convserve.pipelines.registry import Decision, Published
    from convserve.pipelines.worker import _record_publication
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
