"""Backends that fail: a tracking server that answers 502 and a Redis that is not there. The
API (a real process) answers 503 JSON with ``Retry-After`` naming the backend, within its
bounded timeouts, never 500 and never a false 404."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import TINY
from tests.servers import free_port, uvicorn_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


class _BadGateway(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>502 Bad Gateway</html>")

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bad_gateway():  # type: ignore[no-untyped-def]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BadGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _unavailable(answer: httpx.Response, backend: str, reason: str) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert int(answer.headers["retry-after"]) > 0
    detail = answer.json()["detail"]
    assert detail.startswith(f"{backend} is unavailable") and reason in detail, detail


def test_failing_backends_answer_503_naming_them(onnx_path, bad_gateway, tmp_path):
    env = {
        "MLFLOW_TRACKING_URI": bad_gateway,
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "CONVSERVE_API_TOKEN": "tok",
    }
    auth = {"Authorization": "Bearer tok"}
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/jobs", json={"train": TINY}, headers=auth)
        _unavailable(job, "the job queue", "ConnectionError")
        for path in ("/jobs", "/jobs/0123456789abcdef0123456789abcdef", "/datasets"):
            _unavailable(http.get(path), "MLflow", "502")
        _unavailable(http.delete("/datasets/digits-1", headers=auth), "MLflow", "502")
        assert http.get("/readyz").status_code == 200  # predicting needs neither


def test_concurrent_reads_stay_within_mlflows_connection_pool(onnx_path, mlflow_url, tmp_path):
    """Every diagnostics request reads one metric history per statistic: many at once never
    hold more MLflow calls than its connection pool ("Connection pool is full" before)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from convserve.jobs import Tag

    client = MlflowClient(mlflow_url)
    run_id = client.create_run("0", tags={Tag.KIND: "job", Tag.STATUS: "succeeded"}).info.run_id
    metrics = [Metric(f"diag.block{i}.grad_std", 0.1 * s, 0, s) for i in range(24) for s in (1, 2)]
    client.log_batch(run_id, metrics=metrics)
    env = {"MLFLOW_TRACKING_URI": mlflow_url, "CONVSERVE_MODEL_URI": str(onnx_path)}
    with uvicorn_server(env, tmp_path) as url:

        def read(_: int) -> int:
            answer = httpx.get(f"{url}/jobs/{run_id}/diagnostics", timeout=60)
            assert len(answer.json()["statistics"]["grad_std"]) == 24, answer.text
            return answer.status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(read, range(32))) == {200}
    log = "\n".join(path.read_text() for path in tmp_path.glob("serve-*.log"))
    assert "Connection pool is full" not in log
    assert "Traceback" not in log
