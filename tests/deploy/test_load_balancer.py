"""API replicas behind a load balancer: the compose stack's own nginx configuration file
(deploy/nginx/convserve.conf, the service name pointed at local ports), run by Debian's nginx
in front of two real ``convserve serve`` processes that follow one alias on a real MLflow
server."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.deploy.compose import ROOT
from tests.servers import (
    PredictLoad,
    follow_env,
    free_port,
    process,
    registered_model,
    wait_http,
)
from tests.waiting import limit, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
CONF = ROOT / "deploy" / "nginx" / "convserve.conf"


def nginx_config(folder: Path, upstreams: list[int], port: int, retries: bool = True) -> Path:
    """The compose file's nginx configuration with ``api:8000`` as the given local ports,
    inside a main configuration that keeps every path under ``folder``; ``retries=False``:
    a request that fails on one replica is never passed to another."""
    text = CONF.read_text()
    if not retries:
        text = re.sub(r"proxy_next_upstream [^;]*;", "proxy_next_upstream off;", text)
    (line,) = [x for x in text.splitlines() if "server api:8000" in x]
    params = line.split("server api:8000", 1)[1]
    servers = "\n".join(f"    server 127.0.0.1:{p}{params}" for p in upstreams)
    text = text.replace(line, servers).replace("listen 8080;", f"listen 127.0.0.1:{port};")
    (folder / "convserve.conf").write_text(text)
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {kind}_temp_path {folder / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = folder / "nginx.conf"
    main.write_text(
        f"{user}worker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'nginx-error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n    access_log {folder / 'nginx-access.log'};\n{temp}"
        f"    include {folder / 'convserve.conf'};\n}}\n"
    )
    return main


@contextmanager
def nginx(folder: Path, upstreams: list[int], retries: bool = True) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is missing: `make test-deps` installs Debian's")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    main = nginx_config(folder, upstreams, port, retries)
    check = subprocess.run([binary, "-t", "-c", str(main)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    argv = [binary, "-c", str(main), "-g", "daemon off;"]
    with process(argv, folder / "nginx.log", dict(os.environ)) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc, timeout=30)
        yield url


def _replica(stack: ExitStack, env: dict[str, str], folder: Path, port: int):
    cli = str(Path(sys.executable).parent / "convserve")
    full = {**os.environ, **env, "CONVSERVE_PORT": str(port), "CONVSERVE_HOST": "127.0.0.1"}
    proc = stack.enter_context(process([cli, "serve"], folder / f"serve-{port}.log", full))
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=90)
    return proc


def _predictions(port: int) -> float:
    """``POST /predict`` answered 200 by one replica, from its own Prometheus metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    pattern = r'convserve_http_requests_total\{[^}]*route="/predict"[^}]*status="200"[^}]*\} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 120).save(buf, "PNG")
    return buf.getvalue()


def test_two_replicas_behind_nginx(onnx_path, mlflow_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    client, name, (first, second) = registered_model(mlflow_url, onnx_path, "lb", 2)
    client.set_registered_model_alias(name, "champion", first)
    env = follow_env(mlflow_url, name, tmp_path / "cache", CONVSERVE_WORKERS="1")
    ports = [free_port(), free_port()]
    image = _png()
    with ExitStack() as stack:
        replicas = [_replica(stack, env, tmp_path, p) for p in ports]
        url = stack.enter_context(nginx(tmp_path / "nginx", ports))
        http = stack.enter_context(httpx.Client(base_url=url, timeout=30))
        assert http.get("/readyz").status_code == 200

        # the load is spread over both replicas
        for _ in range(100):
            r = http.post("/predict", files={"file": ("x.png", image)})
            assert r.status_code == 200 and r.json()["model"]["version"] == first
        counts = [_predictions(p) for p in ports]
        assert sum(counts) == 100 and min(counts) >= 30, counts
        print(f"100 predictions through nginx: {counts[0]:.0f} / {counts[1]:.0f} per replica")

        # both replicas follow the alias: after it moves, every answer is the new champion
        client.set_registered_model_alias(name, "champion", second)
        for port in ports:
            wait_until(
                lambda port=port: (
                    httpx.get(f"http://127.0.0.1:{port}/v1/model").json()["version"] == second
                ),
                30,
                f"replica {port} serves version {second}",
                0.2,
            )
        versions = {
            http.post("/predict", files={"file": ("x.png", image)}).json()["model"]["version"]
            for _ in range(20)
        }
        assert versions == {second}

        # one replica stops under load: no request fails
        with PredictLoad(url, image, clients=4) as load:
            wait_until(lambda: len(load.versions) >= 20, 30, "20 answers under load")
            before = len(load.versions)
            replicas[0].terminate()  # uvicorn finishes what it holds, then exits
            replicas[0].wait(timeout=limit(30))
            # the survivor keeps answering
            wait_until(lambda: len(load.versions) - before > 40, 30, "40 more answers")
        assert load.failures == []
        assert before > 0 and len(load.versions) - before > 20  # the survivor kept answering
        print(f"one replica stopped under load: {len(load.versions)} answered, 0 failed")
        assert replicas[1].poll() is None


class Endpoints:
    """What a Kubernetes Service does for nginx here: every ``period`` seconds it asks each
    replica's ``/readyz`` (the readiness probe) and, when one is not ready, rewrites the
    balancer's upstreams without it and reloads nginx (SIGHUP: its old workers finish what
    they hold)."""

    def __init__(self, folder: Path, ports: list[int], lb_port: int, lb, period: float = 0.25):  # type: ignore[no-untyped-def]
        import threading

        self.folder, self.ports, self.lb_port, self.lb = folder, list(ports), lb_port, lb
        self.period, self.removed = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _ready(self, port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            for port in [p for p in self.ports if not self._ready(p)]:
                self.ports.remove(port)
                nginx_config(self.folder, self.ports, self.lb_port, retries=False)
                self.lb.send_signal(signal.SIGHUP)
                self.removed.append(port)

    def __enter__(self) -> Endpoints:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_replica_stopping_behind_nginx_without_retries_fails_no_request(onnx_path, tmp_path):
    """nginx passes no failed request on (its retry is off), in front of two replicas under
    load; one is SIGTERMed. For CONVSERVE_SHUTDOWN_DELAY it answers as before while its
    /readyz says 503, the endpoints drop it, and only then does it stop listening: no
    request fails."""
    env = {
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_WORKERS": "1",
        "CONVSERVE_SHUTDOWN_DELAY": str(round(limit(3), 1)),
    }
    ports = [free_port(), free_port()]
    image = _png()
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is missing: `make test-deps` installs Debian's")
    folder, lb_port = tmp_path / "nginx", free_port()
    folder.mkdir()
    main = nginx_config(folder, ports, lb_port, retries=False)
    assert "proxy_next_upstream off;" in (folder / "convserve.conf").read_text()
    with ExitStack() as stack:
        replicas = [_replica(stack, env, tmp_path, p) for p in ports]
        argv = [binary, "-c", str(main), "-g", "daemon off;"]
        lb = stack.enter_context(process(argv, folder / "nginx.log", dict(os.environ)))
        url = f"http://127.0.0.1:{lb_port}"
        wait_http(f"{url}/healthz", lb, timeout=30)
        endpoints = stack.enter_context(Endpoints(folder, ports, lb_port, lb))
        with PredictLoad(url, image, clients=4, keepalive=False) as load:
            wait_until(lambda: len(load.versions) >= 40, 30, "40 answers under load")
            assert min(_predictions(p) for p in ports) > 0  # both replicas answer
            before = len(load.versions)
            replicas[0].send_signal(signal.SIGTERM)
            replicas[0].wait(timeout=limit(30))
            wait_until(lambda: len(load.versions) - before > 80, 30, "80 more answers")
        assert endpoints.removed == [ports[0]]
    assert load.failures == [], load.failures[:5]
    print(f"replica stopped behind nginx without retries: {len(load.versions)} answered, 0 failed")
    assert "SIGTERM: draining" in (tmp_path / f"serve-{ports[0]}.log").read_text()
