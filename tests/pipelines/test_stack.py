"""``convserve up`` (what ``make run`` starts) as a user runs it: a real process tree."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from convserve import logs
from tests.conftest import TINY
from tests.servers import free_port
from tests.waiting import limit, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
CLI = str(Path(sys.executable).parent / "convserve")


def _up(
    tmp: Path, config: Path, mlflow_port: int, api_port: int, log: Path, home: Path
) -> subprocess.Popen[bytes]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "CONVSERVE_", "REDIS_URL"))
    }
    return subprocess.Popen(
        [
            CLI,
            "up",
            "--mlflow-port",
            str(mlflow_port),
            "--api-port",
            str(api_port),
            "--config",
            str(config),
            "--home",
            str(home),
        ],
        cwd=tmp,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> str:
    def ready() -> str | None:
        text = log.read_text(errors="replace")
        assert "convserve is ready" in text or proc.poll() is None, text
        return text if "convserve is ready" in text else None

    return wait_until(ready, timeout, "convserve up is ready", 0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=limit(60))


def test_up_trains_the_first_model_serves_it_stops_cleanly_and_reuses_its_state(tmp_path):
    config = tmp_path / "first.yaml"
    config.write_text(
        yaml.safe_dump({**TINY, "tracking": {}, "optim": {**TINY["optim"], "max_steps": 20}})
    )
    work, home = tmp_path / "work", tmp_path / "state"
    work.mkdir()
    mlflow_port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    proc = _up(work, config, mlflow_port, api_port, tmp_path / "up1.log", home)
    try:
        text = _wait_ready(proc, tmp_path / "up1.log")
        assert "alias: champion (no champion yet; best_val_accuracy 0." in " ".join(text.split())
        assert "epoch 1:" in text and "epoch 2:" not in text  # the tiny config, not the default
        # in a log file, progress is lines, not a bar drawn once at the end
        assert "first model: step 20/20 (100%)" in text and "first model: step 2/20" in text
        assert text.count("View run") <= 1
        assert "Downloading artifacts" not in text  # nor MLflow's bar for a download
        ready = text[text.index("convserve is ready") :].splitlines()
        assert ready[1].split() == ["web", "page:", f"{api}/"]  # the page first
        token = (home / "api-token").read_text().strip()
        assert f"  API token: {token}" in ready  # one unbroken line
        assert f"  API docs:  {api}/docs" in ready
        buf = io.BytesIO()
        Image.new("L", (8, 8), 60).save(buf, "PNG")
        r = httpx.post(f"{api}/predict", files={"file": ("x.png", buf.getvalue())})
        assert r.status_code == 200 and r.json()["model"]["version"] == "1"
        assert httpx.get(f"{api}/healthz").json()["model_version"] == "1"
        assert httpx.get(f"http://127.0.0.1:{mlflow_port}/health").status_code == 200
        # a job writes where the stack lives, not into the folder `up` was started from
        job = {"train": {**TINY, "optim": {**TINY["optim"], "max_steps": 5}}, "register": False}
        auth = {"Authorization": f"Bearer {token}"}
        job_id = httpx.post(f"{api}/jobs", json=job, headers=auth).json()["id"]
        wait_until(
            lambda: httpx.get(f"{api}/jobs/{job_id}").json()["status"] in ("succeeded", "failed"),
            120,
            "the job ends",
            0.5,
        )
        assert httpx.get(f"{api}/jobs/{job_id}").json()["status"] == "succeeded"
        assert (home / "runs" / job_id / "best.pt").exists()
    finally:
        _stop(proc)
    assert "stopped" in (tmp_path / "up1.log").read_text()
    for name in ("api", "worker", "mlflow"):  # every line of every log with its time
        lines = (home / f"{name}.log").read_text().splitlines()
        assert lines and [line for line in lines if not logs.STAMPED.match(line)] == [], name
    assert sorted(p.name for p in work.iterdir()) == []  # nothing written outside the home
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/healthz", timeout=2)
    # the second start reuses the registry: no training, no empty bar, same token
    proc = _up(work, config, mlflow_port, api_port, tmp_path / "up2.log", home)
    try:
        text = _wait_ready(proc, tmp_path / "up2.log")
        assert "nothing to do" in text and f"API token: {token}" in text
        assert "first model" not in text
    finally:
        _stop(proc)


@pytest.mark.parametrize("option", ["--mlflow-port", "--api-port"])
def test_a_port_another_program_holds_stops_up_before_anything_starts(tmp_path, option):
    """The port is checked first: the error names the option, and nothing was started or
    written (where the API's port used to be found taken only after the first model trained)."""
    import socket

    ports = {"--mlflow-port": free_port(), "--api-port": free_port()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[option]))
        taken.listen()
        argv = [CLI, "up", "--home", str(tmp_path / "home")]
        for name, port in ports.items():
            argv += [name, str(port)]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    message = " ".join(done.stderr.split())  # the console wraps at its width
    assert f"cannot use port {ports[option]} on 127.0.0.1 ({option})" in message
    assert f"choose another with {option}" in message
    assert not (tmp_path / "home").exists()


def test_waiting_on_a_port_that_speaks_another_protocol_says_so():
    """A server that answers with bytes that are not HTTP (a gRPC server, a database) on the
    port being waited on is a clear error, not a traceback from http.client."""
    import socket
    import threading

    from convserve.pipelines.stack import wait_ready

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00@\x00\r\n")

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(RuntimeError, match="another program holds the port"):
            wait_ready(f"http://127.0.0.1:{port}/health", None, 10)
