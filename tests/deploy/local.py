"""A deployment's containers as local processes (there is no container engine here).

Each process runs in its image's environment (``images.image_env``: what the image installs
from its lock), with the command and environment the compose file or manifest states and
nothing of this test process's environment. Only what a container engine would provide is
stood in for: the service host names and ports become 127.0.0.1 and free ports, the paths of
mounted volumes become folders of the test, the container's own ``/tmp`` and working
directory become empty folders of its own.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.images import ROOT, image_env
from tests.servers import free_port
from tests.waiting import limit, wait_until


@dataclass
class Container:
    """One service's process: its image, command, environment and mounts."""

    name: str
    image: str | None  # an image environment; None: a program of this machine (redis-server)
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, Path] = field(default_factory=dict)  # container path -> local folder
    workdir: str = "/app"  # the images' WORKDIR


class Deployment:
    """The processes of one deployment under ``folder``; host names in ``hosts`` (name ->
    container port) answer on 127.0.0.1 at a free port each."""

    def __init__(self, folder: Path, hosts: dict[str, int]) -> None:
        self.folder = folder
        self.hosts = hosts
        self.ports = {name: free_port() for name in hosts}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.containers: dict[str, Container] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    # what the container engine does ------------------------------------------------------
    def local(self, value: str, container: Container) -> str:
        """``value`` as seen from this machine: service addresses and mount paths."""
        for name, port in self.hosts.items():
            value = re.sub(
                rf"(?<=[/@]){re.escape(name)}:{port}\b", f"127.0.0.1:{self.ports[name]}", value
            )
        if value.startswith((str(self.folder), str(ROOT))):  # a path of this machine already
            return value
        for path in sorted(container.mounts, key=len, reverse=True):
            if value == path or value.startswith(path + "/"):
                return str(container.mounts[path]) + value[len(path) :]
        return value

    def argv(self, container: Container, argv: list[str]) -> list[str]:
        """The command with its listening address on this machine and the program taken
        from the container's image environment."""
        out = [self.local(a, container) for a in argv]
        for i, arg in enumerate(out[:-1]):
            if arg == "--host":
                out[i + 1] = "127.0.0.1"
            elif arg == "--port" and container.name in self.ports:
                out[i + 1] = str(self.ports[container.name])
        if container.image is not None:
            program = image_env(container.image) / "bin" / out[0]
            if program.exists():
                out[0] = str(program)
        return out

    def environment(self, container: Container) -> dict[str, str]:
        """The stated environment alone, plus what every container has: PATH (its image
        environment first), HOME and TMPDIR in its own folders."""
        own = self.folder / container.name
        for sub in ("tmp", "home", "workdir"):
            (own / sub).mkdir(parents=True, exist_ok=True)
        container.mounts.setdefault("/tmp", own / "tmp")
        for path, local in container.mounts.items():  # volumes inside the working directory
            if path.startswith(container.workdir + "/"):
                link = self.workdir(container) / path[len(container.workdir) + 1 :]
                if not link.is_symlink():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(local)
        path = "/usr/local/bin:/usr/bin:/bin:/usr/sbin"
        if container.image is not None:
            path = f"{image_env(container.image) / 'bin'}:{path}"
        env = {"PATH": path, "HOME": str(own / "home"), "LANG": "C.UTF-8"}
        env.update({k: self.local(v, container) for k, v in container.env.items()})
        env["TMPDIR"] = str(container.mounts["/tmp"])
        return env

    # processes ------------------------------------------------------------------------------
    def _launch(self, container: Container) -> dict[str, Any]:
        """What both a service and a one-shot container start with."""
        self.containers[container.name] = container
        return {
            "args": self.argv(container, container.argv),
            "env": self.environment(container),
            "cwd": self.workdir(container),
            "stderr": subprocess.STDOUT,
        }

    def start(self, container: Container) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{container.name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(stdout=log, start_new_session=True, **self._launch(container))
        self.procs[container.name] = proc
        return proc

    def run(self, container: Container, timeout: float) -> subprocess.CompletedProcess[str]:
        """A one-shot container (a Job, compose's bootstrap) to its end."""
        with open(self.folder / f"{container.name}.log", "ab") as log:
            done = subprocess.run(stdout=log, timeout=limit(timeout), **self._launch(container))
        return subprocess.CompletedProcess(done.args, done.returncode, self.log(container.name))

    def wait(self, what: str, condition: Callable[[], Any], timeout: float) -> Any:
        """``condition()``'s first true value, polled until ``timeout``; else the test fails
        with every container's log."""
        try:
            return wait_until(condition, timeout, what, 0.3)
        except AssertionError as err:
            pytest.fail(f"{err}\n{self.logs()}")

    def check(self, name: str, argv: list[str], shell: bool = False) -> tuple[int, str]:
        """A health check or exec probe inside ``name``'s container: its environment, its
        image's programs; ``localhost`` at the container's port is its local port."""
        container = self.containers[name]
        if shell:
            argv = ["/bin/sh", "-c", shlex.join(argv) if len(argv) > 1 else argv[0]]
        else:
            argv = self.argv(container, argv)
        if argv[0] == "redis-cli":  # the default port is the container's
            argv = [*argv, "-p", str(self.ports[name])]
        if name in self.ports:
            own = f"127.0.0.1:{self.ports[name]}"
            argv = [re.sub(rf"(localhost|127\.0\.0\.1):{self.hosts[name]}\b", own, a) for a in argv]
        done = subprocess.run(
            argv,
            env=self.environment(container),
            cwd=self.workdir(container),
            capture_output=True,
            text=True,
            timeout=limit(60),
        )
        return done.returncode, done.stdout + done.stderr

    def workdir(self, container: Container) -> Path:
        return self.folder / container.name / "workdir"

    def written(self, name: str) -> list[str]:
        """What the container wrote into its working directory (outside its mounts)."""
        workdir = self.workdir(self.containers[name])
        mounted = {p for p in self.containers[name].mounts.values()}
        return sorted(
            str(p.relative_to(workdir))
            for p in workdir.rglob("*")
            if not p.is_symlink() and not any(p == m or m in p.parents for m in mounted)
        )

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.containers)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=limit(20))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http_ok(url: str) -> bool:
    """``url`` answers 200 (a readiness probe, a health check over HTTP)."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
