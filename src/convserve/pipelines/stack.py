"""``convserve up``: the whole product on one machine, and the first-model bootstrap.

Starts and supervises an MLflow server (SQLite store, local artifacts), one worker and the
API; trains, exports, registers and promotes the default model first when the registry has
no champion. All state lives in one folder (``.convserve/`` by default) and is reused.
"""

from __future__ import annotations

import http.client
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from convserve import logs
from convserve.processes import die_with_parent, port_taken
from convserve.redact import redact
from convserve.training.configfiles import load_config

if TYPE_CHECKING:
    from convserve.pipelines.registry import Published


def bootstrap(
    tracking_uri: str,
    model_name: str = "convserve",
    config: str = "default",
    callbacks: Any = None,
    output_dir: str = "runs",
) -> Published | None:
    """Train, export, register and promote ``config`` unless the registry has a champion."""
    from convserve.pipelines.registry import Policy, champion_version, publish
    from convserve.training.run import train
    from convserve.training.tracking import mlflow_client

    if champion_version(mlflow_client(tracking_uri), model_name) is not None:
        return None
    cfg = load_config(
        config,
        [
            f"tracking.tracking_uri={tracking_uri}",
            f"tracking.output_dir={output_dir}",
            "tracking.run_name=bootstrap",
        ],
    )
    result = train(cfg, callbacks=callbacks)
    if result.status != "finished" or result.run_id is None:
        raise RuntimeError(f"the first model did not train: {result.status} {result.message}")
    return publish(
        run_id=result.run_id, tracking_uri=tracking_uri, policy=Policy(model_name=model_name)
    )


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:  # not listening yet (a dropped connection is one too)
            time.sleep(0.3)
        except http.client.HTTPException as err:
            raise RuntimeError(
                f"{url} answered with something other than HTTP ({type(err).__name__}): "
                "another program holds the port"
            ) from None
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def mlflow_server_argv(backend_uri: str, artifacts: Path, host: str, port: int) -> list[str]:
    """``mlflow server`` with one worker, proxied artifacts and MLflow's job runner off; the
    job runner setting travels in ``MLFLOW_SERVER_ENV``."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def copy_stamped(pipe: IO[bytes], path: Path, name: str) -> None:
    """Every line of ``pipe`` to ``path`` as it comes, redacted, each with a timestamp
    (``logs.stamp``; with ``CONVSERVE_LOG_FORMAT=json``, a JSON object naming ``name``)."""
    kind = logs.log_format()
    with open(path, "ab", buffering=0) as out:
        for raw in iter(pipe.readline, b""):
            # a progress bar redraws its line after "\r": keep what a terminal would show
            shown = [part for part in raw.decode(errors="replace").split("\r") if part.strip()]
            line = redact(shown[-1].rstrip("\n") if shown else "")
            out.write((logs.stamp(line, kind, name) + "\n").encode())
    pipe.close()


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        """Its output goes to ``log`` through a thread that puts the time in front of every
        line that has none (MLflow's server, prints, tracebacks; convserve's own log lines
        carry theirs)."""
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        assert self.proc.stdout is not None
        threading.Thread(
            target=copy_stamped,
            args=(self.proc.stdout, self.log, self.name),
            daemon=True,
            name=f"convserve-log-{self.name}",
        ).start()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Stack:
    home: Path
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    api_port: int = 8000
    model_name: str = "convserve"
    config: str = "default"  # what the first model is trained from
    children: list[Child] = field(default_factory=list)

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def token(self) -> str:
        """CONVSERVE_API_TOKEN, else one made on the first run and kept in the state folder."""
        if os.environ.get("CONVSERVE_API_TOKEN"):
            return os.environ["CONVSERVE_API_TOKEN"]
        path = self.home / "api-token"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(24))
            path.chmod(0o600)
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update(
            {
                "MLFLOW_TRACKING_URI": self.tracking_uri,
                "CONVSERVE_API_TOKEN": self.token(),
                "CONVSERVE_MODEL_URI": f"models:/{self.model_name}@champion",
                "CONVSERVE_HOST": self.host,
                "CONVSERVE_PORT": str(self.api_port),
                "CONVSERVE_QUEUE_PATH": str(self.home / "queue.db"),
                "CONVSERVE_CACHE_DIR": str(self.home / "models"),
                "CONVSERVE_RUNS_DIR": str(self.home / "runs"),
                "CONVSERVE_MLFLOW_UI_URL": self.tracking_uri,
            }
        )
        return env

    def mlflow(self) -> Child:
        argv = mlflow_server_argv(
            f"sqlite:///{self.home / 'mlflow.db'}",
            self.home / "mlartifacts",
            self.host,
            self.mlflow_port,
        )
        env = {**os.environ, **MLFLOW_SERVER_ENV}
        return Child("mlflow", argv, env, self.home / "mlflow.log")

    def cli(self, name: str, *args: str) -> Child:
        argv = [str(Path(sys.executable).parent / "convserve"), *args]
        return Child(name, argv, self.env(), self.home / f"{name}.log")

    def check_ports(self) -> None:
        """Both ports free on ``host``: a port another program holds is found before anything
        starts, not after the first model has trained."""
        if self.mlflow_port == self.api_port:
            raise RuntimeError(f"--mlflow-port and --api-port are both {self.api_port}")
        for port, option in ((self.mlflow_port, "--mlflow-port"), (self.api_port, "--api-port")):
            problem = port_taken(self.host, port)
            if problem:
                raise RuntimeError(
                    f"cannot use port {port} on {self.host} ({option}): {problem}; "
                    f"stop the program that holds it, or choose another with {option}"
                )

    def start(self, say: Callable[[str], None]) -> None:
        self.check_ports()
        self.home.mkdir(parents=True, exist_ok=True)
        mlflow = self.mlflow()
        self._run(mlflow, say)
        wait_ready(f"{self.tracking_uri}/health", mlflow.proc, 120)
        say(f"MLflow ready at {self.tracking_uri}")
        # In its own process, so that torch leaves memory once the first model is trained.
        first = self.cli(
            "bootstrap",
            "bootstrap",
            "--model-name",
            self.model_name,
            "--config",
            self.config,
            "--output-dir",
            str(self.home / "runs"),
        )
        if subprocess.run(first.argv, env=first.env, check=False).returncode != 0:
            raise RuntimeError("the first model could not be trained (see above)")
        self._run(self.cli("worker", "worker"), say)
        api = self.cli("api", "serve")
        self._run(api, say)
        wait_ready(f"{self.api_url}/readyz", api.proc, 120)

    def _run(self, child: Child, say: Callable[[str], None]) -> None:
        child.start()
        self.children.append(child)
        say(f"started {child.name} (pid {child.proc.pid if child.proc else '?'}, log {child.log})")

    def supervise(self, say: Callable[[str], None], stop: Callable[[], bool]) -> None:
        """Restart a child that exits, at most 5 times a minute; return when ``stop()``."""
        while not stop():
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    now = time.monotonic()
                    child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                    if len(child.restarts) > 5:
                        raise RuntimeError(f"{child.name} keeps exiting; see {child.log}")
                    say(f"{child.name} exited with {child.proc.returncode}; restarting")
                    child.start()
            time.sleep(1.0)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
