"""Credentials in the tracking URI stay secret: the API and a worker run with a password in
``MLFLOW_TRACKING_URI`` (a real MLflow server, which ignores it), serve a model, run a job
and fail on a backend; every answer, page, log line, MLflow param and tag is searched for
the password."""

import io
import logging
import uuid

import httpx
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from convserve import logs
from convserve.redact import redact
from tests.conftest import TINY
from tests.servers import (
    free_port,
    register_onnx,
    uvicorn_server,
    wait_for_job,
    wait_for_prediction,
    worker_process,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
PASSWORD = "pa55-" + uuid.uuid4().hex


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://admin:s3cret@mlflow:5000/x", "http://admin:***@mlflow:5000/x"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("postgresql+psycopg2://u:p@ss@db/optuna", "postgresql+psycopg2://u:***@db/optuna"),
        ("https://s3/b/k?X-Amz-Signature=abc&n=1", "https://s3/b/k?X-Amz-Signature=***&n=1"),
        ("GET /api?token=abc", "GET /api?token=***"),
        ("mail me at a@b.org, x=1", "mail me at a@b.org, x=1"),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ],
)
def test_redact(text, shown):
    assert redact(text) == shown


def test_log_lines_carry_a_time_and_no_password(monkeypatch, capsys):
    record = logging.LogRecord(
        "convserve.x", logging.WARNING, __file__, 1, "at %s", ("http://u:pw@h",), None
    )
    text = logs.Formatter("text").format(record)
    assert logs.STAMPED.match(text) and text.endswith("WARNING convserve.x: at http://u:***@h")
    line = logs.Formatter("json").format(record)
    assert logs.STAMPED.match(line) and '"message": "at http://u:***@h"' in line
    monkeypatch.setenv(logs.LOG_FORMAT, "xml")
    with pytest.raises(ValueError, match="CONVSERVE_LOG_FORMAT='xml'"):
        logs.log_format()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 90).save(buf, "PNG")
    return buf.getvalue()


def test_a_password_in_the_tracking_uri_is_shown_nowhere(onnx_path, mlflow_url, tmp_path):
    import onnx

    secret_uri = mlflow_url.replace("http://", f"http://convserve:{PASSWORD}@")
    dead_uri = f"http://convserve:{PASSWORD}@127.0.0.1:{free_port()}"
    name = f"secret-{uuid.uuid4().hex[:6]}"
    env = {
        "MLFLOW_TRACKING_URI": secret_uri,
        "CONVSERVE_MODEL_URI": f"models:/{name}@champion",
        "CONVSERVE_POLL_INTERVAL": "0.3",
        "CONVSERVE_CACHE_DIR": str(tmp_path / "cache"),
        "CONVSERVE_API_TOKEN": "tok",
        "CONVSERVE_QUEUE_PATH": str(tmp_path / "queue.db"),
        "CONVSERVE_RUNS_DIR": str(tmp_path / "runs"),
        "CONVSERVE_MLFLOW_UI_URL": secret_uri,
    }
    seen: list[str] = []
    auth = {"Authorization": "Bearer tok"}
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as http:
        # nothing registered yet: the not-ready answers quote what could not be resolved
        for path in ("/readyz", "/v1/model", "/healthz"):
            seen.append(http.get(path).text)
        seen.append(http.post("/predict", files={"file": ("x.png", _png())}).text)
        client = MlflowClient(mlflow_url)
        version = register_onnx(client, name, onnx.load(str(onnx_path)))
        client.set_registered_model_alias(name, "champion", version)
        seen.append(wait_for_prediction(http, _png()).text)
        with worker_process(env, tmp_path):
            job = {"train": {**TINY, "tracking": {"experiment": name}}, "register": False}
            created = http.post("/jobs", json=job, headers=auth)
            assert created.status_code == 202, created.text
            done = wait_for_job(http, created.json()["id"], timeout=180)
            assert done["status"] == "succeeded", done
        for path in ("/readyz", "/v1/model", "/", "/jobs", f"/jobs/{done['id']}", "/metrics"):
            answer = http.get(path)
            assert answer.status_code == 200, (path, answer.text)
            seen.append(answer.text)
        seen.append(http.post("/admin/reload", headers=auth).text)
        run = client.get_run(done["id"])
        seen += [*run.data.params.values(), *run.data.tags.values()]
    # a tracking server that does not answer: the errors name it, without the password
    with uvicorn_server({**env, "MLFLOW_TRACKING_URI": dead_uri}, tmp_path) as url:
        wait_until(lambda: "cannot resolve" in httpx.get(f"{url}/readyz").text, 30, "an error")
        seen += [httpx.get(f"{url}{path}", timeout=60).text for path in ("/readyz", "/jobs")]
    seen += [path.read_text() for path in tmp_path.glob("*.log")]
    leaks = [text[:300] for text in seen if PASSWORD in text]
    assert leaks == []
    assert any("convserve:***@" in text for text in seen)  # the URIs are shown, masked


def test_json_logs_are_one_object_a_line(onnx_path, tmp_path):
    """``CONVSERVE_LOG_FORMAT=json``: every line the service writes, uvicorn's included, is
    a JSON object with its time, level, logger and message."""
    import json

    env = {"CONVSERVE_MODEL_URI": str(onnx_path), "CONVSERVE_LOG_FORMAT": "json"}
    with uvicorn_server(env, tmp_path) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200
    lines = next(tmp_path.glob("serve-*.log")).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["logger"] == "uvicorn.error" for r in records)
    assert any(r["message"].startswith("serving ") for r in records)
    assert logs.stamp("plain", "json", "mlflow").startswith('{"time": ')
