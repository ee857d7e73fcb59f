"""Real server processes for tests: an MLflow tracking server on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from convserve.pipelines.stack import wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    """Until ``url`` answers 200; fails early if ``proc`` exits (the product's own helper)."""
    wait_ready(url, proc, timeout)


@contextmanager
def mlflow_server(folder: Path, backend_uri: str | None = None) -> Iterator[str]:
    """Start ``mlflow server`` (SQLite in ``folder`` unless ``backend_uri``), yield its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend_uri or f"sqlite:///{folder / 'mlflow.db'}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(folder / "mlflow-server.log", "wb")  # noqa: SIM115
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def uvicorn_server(env: dict[str, str], cwd: Path) -> Iterator[str]:
    """``convserve serve`` as a real process; yields its base URL."""
    port = free_port()
    full = {**os.environ, **env, "CONVSERVE_PORT": str(port), "CONVSERVE_HOST": "127.0.0.1"}
    log = open(cwd / f"serve-{port}.log", "wb")  # noqa: SIM115
    cli = str(Path(sys.executable).parent / "convserve")
    proc = subprocess.Popen(
        [cli, "serve"],
        env=full,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, timeout=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def worker_process(
    env: dict[str, str], cwd: Path, name: str = "worker"
) -> Iterator[subprocess.Popen[bytes]]:
    """``convserve worker`` as a real process."""
    log = open(cwd / f"{name}.log", "ab")  # noqa: SIM115
    cli = str(Path(sys.executable).parent / "convserve")
    proc = subprocess.Popen(
        [cli, "worker"],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
