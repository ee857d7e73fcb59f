"""The compose topology without Docker: each service's own command and environment from
docker-compose.yml, run as a local process, with the service host names pointed at 127.0.0.1
and this machine's PostgreSQL and Redis in place of those containers."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import TINY
from tests.deploy.compose import ROOT, load, read_env
from tests.servers import free_port, wait_http

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _local(value: str, ports: dict[str, int], tmp: Path) -> str:
    return (
        value.replace("@postgres:5432", "@127.0.0.1:5432")
        .replace("http://mlflow:5000", f"http://127.0.0.1:{ports['mlflow']}")
        .replace("redis://redis:6379", "redis://127.0.0.1:6379")
        .replace("/mlartifacts", str(tmp / "mlartifacts"))
    )


def _argv(command: str | list[str]) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    return [str(BIN / argv[0]), *argv[1:]]


def _swap(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def test_compose_services_as_local_processes(tmp_path, postgres_database):
    database = postgres_database
    env_file = {
        **read_env(ROOT / ".env.example"),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": database,
        "CONVSERVE_API_TOKEN": "topology-token",
    }
    services = load(env_file)["services"]
    ports = {"mlflow": free_port(), "api": free_port()}
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVSERVE_", "MLFLOW"))}
        env.update(
            {
                k: _local(str(v), ports, tmp_path)
                for k, v in services[name].get("environment", {}).items()
            }
        )
        env.update(extra)
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    queue = {
        "CONVSERVE_QUEUE_NAME": f"topology-{uuid.uuid4().hex[:6]}",
        "CONVSERVE_CACHE_DIR": str(tmp_path / "cache"),
        "CONVSERVE_POLL_INTERVAL": "0.5",
    }
    try:
        mlflow_argv = [_local(a, ports, tmp_path) for a in _argv(services["mlflow"]["command"])]
        mlflow_argv = _swap(
            _swap(mlflow_argv, "--port", str(ports["mlflow"])), "--host", "127.0.0.1"
        )
        mlflow_argv = _swap(mlflow_argv, "--workers", "1")
        # Clients here reach "mlflow:5000" as 127.0.0.1:<port>: admit that name as well.
        hosts = mlflow_argv[mlflow_argv.index("--allowed-hosts") + 1]
        mlflow_argv = _swap(mlflow_argv, "--allowed-hosts", f"{hosts},127.0.0.1:{ports['mlflow']}")
        mlflow = start("mlflow", mlflow_argv, {})
        url = f"http://127.0.0.1:{ports['mlflow']}"
        wait_http(f"{url}/health", mlflow, timeout=120)
        # MLflow admits the compose service name in the Host header, and refuses others.
        api = f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        assert httpx.get(api, headers={"Host": "mlflow:5000"}).status_code == 200
        assert httpx.get(api, headers={"Host": "evil.example"}).status_code == 403

        start("worker", _argv(services["worker"]["command"]), queue)
        api_argv = _swap(
            _swap(_argv(services["api"]["command"]), "--port", str(ports["api"])),
            "--host",
            "127.0.0.1",
        )
        api = start("api", api_argv, queue)
        api_url = f"http://127.0.0.1:{ports['api']}"
        wait_http(f"{api_url}/healthz", api, timeout=60)

        with httpx.Client(base_url=api_url, timeout=30) as http:
            assert http.get("/readyz").status_code == 503  # an empty registry
            job = http.post(
                "/jobs",
                json={"train": {**TINY, "tracking": {}}},
                headers={"Authorization": "Bearer topology-token"},
            )
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                state = http.get(f"/jobs/{job_id}").json()
                if (
                    state["status"] in ("succeeded", "failed")
                    and http.get("/readyz").status_code == 200
                ):
                    break
                time.sleep(0.5)
            assert state["status"] == "succeeded", state
            assert state["promoted"] is True
            buf = io.BytesIO()
            Image.new("L", (8, 8), 128).save(buf, "PNG")
            r = http.post("/predict", files={"file": ("x.png", buf.getvalue())})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == {
                "name": "convserve",
                "version": "1",
                "alias": "champion",
                "run_id": job_id,
            }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
