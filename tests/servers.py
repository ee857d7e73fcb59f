"""Real server processes for tests: an MLflow tracking server on a free port."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convserve.pipelines.stack import MLFLOW_SERVER_ENV, mlflow_server_argv, wait_ready
from convserve.processes import port_taken
from tests.waiting import limit, wait_until

if TYPE_CHECKING:
    import httpx

ENDED = frozenset({"succeeded", "failed", "cancelled"})


# Ports handed out by free_port: each pytest-xdist worker draws from its own block below the
# kernel's ephemeral range (32768-60999 on Linux), so two workers never get the same port, and
# no port the kernel picks for a client socket or a ``bind(0)`` can take one between the draw
# and the server's bind. (A port from ``bind(0)`` is free only until the socket closes: another
# worker's server, say a gRPC one bound with SO_REUSEPORT, could take it first.)
_PORT_BLOCK = 750
_PORT_START = 20000 + _PORT_BLOCK * (
    int(os.environ.get("PYTEST_XDIST_WORKER", "gw15").removeprefix("gw")) % 16  # main: the last
)
# the block's ports in turn, from a place of this process's own (a rerun starts elsewhere)
_PORTS = (_PORT_START + n % _PORT_BLOCK for n in itertools.count(os.getpid()))


def free_port() -> int:
    """A port no other test process will be given, and that nothing holds now."""
    for port in itertools.islice(_PORTS, _PORT_BLOCK):
        if port_taken("127.0.0.1", port) is None:
            return port
    raise RuntimeError(f"no free port in {_PORT_START}-{_PORT_START + _PORT_BLOCK - 1}")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    """Until ``url`` answers 200, within ``limit(timeout)``; fails early if ``proc`` exits
    (the product's own helper)."""
    wait_ready(url, proc, limit(timeout))


@contextmanager
def process(
    argv: list[str],
    log: Path,
    env: dict[str, str],
    cwd: Path | None = None,
    stop_timeout: float = 20.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real process logging to ``log``, terminated (then killed) when the block ends."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=limit(stop_timeout))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def mlflow_server(folder: Path, backend_uri: str | None = None) -> Iterator[str]:
    """Start ``mlflow server`` (SQLite in ``folder`` unless ``backend_uri``), yield its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend_uri or f"sqlite:///{folder / 'mlflow.db'}"
    argv = mlflow_server_argv(backend, folder / "artifacts", "127.0.0.1", port)
    env = {**os.environ, **MLFLOW_SERVER_ENV}
    with process(argv, folder / "mlflow-server.log", env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc)
        yield url


@contextmanager
def uvicorn_server(env: dict[str, str], cwd: Path) -> Iterator[str]:
    """``convserve serve`` as a real process; yields its base URL. One server process unless
    ``env`` asks for more (``CONVSERVE_WORKERS``): the tests that need several say so. It
    serves its default model alone unless ``env`` sets ``CONVSERVE_MODELS``: the MLflow
    server a test process shares holds the other tests' models."""
    port = free_port()
    full = {**os.environ, "CONVSERVE_WORKERS": "1", "CONVSERVE_MODELS": "", **env}
    full.update({"CONVSERVE_PORT": str(port), "CONVSERVE_HOST": "127.0.0.1"})
    cli = str(Path(sys.executable).parent / "convserve")
    with process([cli, "serve"], cwd / f"serve-{port}.log", full, cwd) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc, timeout=60)
        yield url


@contextmanager
def worker_process(
    env: dict[str, str], cwd: Path, name: str = "worker"
) -> Iterator[subprocess.Popen[bytes]]:
    """``convserve worker`` as a real process."""
    cli = str(Path(sys.executable).parent / "convserve")
    with process([cli, "worker"], cwd / f"{name}.log", {**os.environ, **env}, cwd) as proc:
        yield proc


class PredictLoad:
    """``clients`` threads posting one image to ``url/predict`` until the block ends; keeps
    the version of each answer and every failure (an error, or a status other than 200).
    ``keepalive=False``: a new connection for every request."""

    def __init__(self, url: str, image: bytes, clients: int, keepalive: bool = True) -> None:
        import threading

        self.url, self.image, self.keepalive = url, image, keepalive
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post) for _ in range(clients)]

    def _post(self) -> None:
        import httpx

        limits = httpx.Limits() if self.keepalive else httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=30, limits=limits) as http:
            while not self._stop.is_set():
                try:
                    r = http.post("/predict", files={"file": ("x.png", self.image)})
                except httpx.HTTPError as err:
                    self.failures.append(repr(err))
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    self.versions.append(r.json()["model"]["version"])

    def __enter__(self) -> PredictLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def follow_env(mlflow_url: str, name: str, cache: Path, **extra: str) -> dict[str, str]:
    """``convserve serve`` following ``models:/NAME@champion`` on ``mlflow_url``, polling
    every 0.3 s; ``extra`` settings added."""
    return {
        "CONVSERVE_MODEL_URI": f"models:/{name}@champion",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_POLL_INTERVAL": "0.3",
        "CONVSERVE_CACHE_DIR": str(cache),
        "CONVSERVE_API_TOKEN": "tok",
        **extra,
    }


def registered_model(mlflow_url: str, onnx_path: Path, prefix: str, count: int):  # type: ignore[no-untyped-def]
    """A new registered model ``<prefix>-<random>`` on ``mlflow_url`` with ``count`` versions,
    each the model at ``onnx_path``: (the client, its name, the versions)."""
    import uuid

    import onnx
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url)
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    proto = onnx.load(str(onnx_path))
    return client, name, [register_onnx(client, name, proto) for _ in range(count)]


def register_onnx(client, name: str, proto) -> str:  # type: ignore[no-untyped-def]
    """Log ``proto`` (an ``onnx.ModelProto``) to a new run of ``client``'s tracking server and
    register it as a new version of ``name``; the version."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(
            proto,
            name="model",
            registered_model_name=name,
            save_as_external_data=False,
            # stated: MLflow's inference would import the model in another interpreter
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        )
    return str(info.registered_model_version)


def wait_for_job(
    http: httpx.Client, job_id: str, statuses: Collection[str] = ENDED, timeout: float = 120
) -> dict[str, Any]:
    """``GET /jobs/{job_id}`` until its status is one of ``statuses``; the job."""

    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = http.get(f"/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(reached, timeout, f"job {job_id} reaches {sorted(statuses)}", 0.3)


def wait_for_prediction(
    http: httpx.Client, image: bytes, timeout: float = 30, model: str | None = None
) -> httpx.Response:
    """``POST /predict`` (to ``model``, else the default one) with ``image`` until it is
    answered 200 (a new champion served)."""
    params = {"model": model} if model else {}

    def answered() -> httpx.Response | None:
        r = http.post("/predict", params=params, files={"file": ("x.png", image)})
        return r if r.status_code == 200 else None

    return wait_until(answered, timeout, "the API serves the champion", 0.3)
