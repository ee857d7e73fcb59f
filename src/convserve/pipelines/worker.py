"""``convserve worker``: take jobs and sweep trials from the queue and run them to their end.

The worker process watches the queue and, while tasks wait, keeps one job process running
(``python -m convserve.pipelines.tasks``, ``tasks.py``): that process imports torch, takes the
tasks one at a time, and exits once none has come for ``CONVSERVE_WORKER_IDLE_EXIT`` seconds,
so that torch, the data sets and the allocator's caches of the last job are not held by an
idle worker. It dies with the worker (a killed worker leaves no job running). A thread of the
worker, the reaper (``reaper.py``), takes jobs and trials from workers that stopped beating;
another writes the liveness file (``liveness.py``). Nothing here imports torch. The API never
imports this module.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from convserve.jobs import WORKER_PID, JobQueue, JobSettings
from convserve.pipelines import liveness
from convserve.pipelines.reaper import run_reaper
from convserve.processes import SignalFlag
from convserve.redact import error_line, redact

log = logging.getLogger(__name__)

LOOK_SECONDS = 1.0  # how often an idle worker looks at the queue


def unusable_backends(settings: JobSettings) -> list[str]:
    """What a worker needs, each tried once, bounded in time: the queue, MLflow (the tracking
    URI) and the study storage; why each that fails cannot be used."""
    import mlflow

    from convserve.pipelines import study as studies

    def tracking() -> None:
        from convserve.training.tracking import mlflow_client

        # one try, 10 s: MLflow's client would retry a server that is down for minutes
        bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        before = {k: os.environ.get(k) for k in bounded}
        os.environ.update(bounded)
        try:
            mlflow_client().search_experiments(max_results=1)
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    where = f"Redis ({settings.redis_url})" if settings.redis_url else settings.queue_path
    checks = {
        f"the queue, {where}": lambda: JobQueue(settings).pending_count(),
        f"MLflow, {mlflow.get_tracking_uri()}": tracking,
        f"the study storage, {studies.storage_url(settings)}": lambda: studies.open_storage(
            settings
        ),
    }
    problems = []
    for name, check in checks.items():
        try:
            check()
        except Exception as err:
            problems.append(redact(f"{name}: {error_line(err, 300)}"))
    return problems


def run_worker(settings: JobSettings, say: Any = log.info) -> None:
    """Run jobs until SIGTERM or SIGINT: a job process while tasks wait, the reaper and the
    liveness file in threads. SIGTERM drains: no task is taken, the running job or trial
    stops at the next step, keeps its exact place in a checkpoint and goes back to the queue
    at once (another worker goes on from there), and the worker exits within
    ``drain_seconds`` (then the job process is killed, and its job taken over when its
    heartbeat goes stale). SIGINT (Ctrl-C) lets the running task finish, and a second SIGINT
    stops it at once."""
    import mlflow

    # a log, not a terminal: no bar redrawn for every artifact (here and in job processes)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    queue = JobQueue(settings)  # this process enqueues (the reaper) but runs nothing
    stop = SignalFlag()  # set by the signal handler below: no lock (processes.SignalFlag)
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()
        if signum == signal.SIGINT and len(received) > 1:
            jobs.interrupt()  # the graceful stop below waits on it: no wait here

    threading.Thread(
        target=run_reaper, args=(settings, stop, queue), daemon=True, name="convserve-reaper"
    ).start()
    alive = liveness.keep_alive(
        Path(settings.worker_liveness_file), settings.heartbeat_interval, queue.pending_count, stop
    )
    where = f"redis {settings.queue_name}" if settings.redis_url else settings.queue_path
    say(redact(f"convserve worker: queue {where}, tracking {mlflow.get_tracking_uri()}"))
    jobs = JobProcess()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        while not stop.wait(LOOK_SECONDS):
            if not jobs.running() and _pending(queue):
                jobs.start()
    finally:
        stop.set()
        graceful = received[:1] == [signal.SIGINT]
        if graceful and jobs.running():
            say("stopping: the running task finishes first (Ctrl-C again to stop it now)")
        elif jobs.running():
            say(
                f"draining: the running task stops at its next step and goes back to the queue "
                f"(at most {settings.drain_seconds:g} s)"
            )
        jobs.stop(graceful=graceful, limit=settings.drain_seconds)
        alive.join(timeout=5)  # the liveness file goes with the worker


def _pending(queue: JobQueue) -> bool:
    try:
        return queue.pending_count() > 0
    except Exception as err:  # the queue is away: the liveness file ages, the check fails
        log.warning("cannot read the queue: %s", err)
        return False


class JobProcess:
    """The worker's one job process: started while tasks wait, gone when idle."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        if self.proc is None:
            return False
        code = self.proc.poll()
        if code is None:
            return True
        if code != 0:
            log.warning("job process %d exited with %d", self.proc.pid, code)
        self.proc = None
        return False

    def start(self) -> None:
        env = {**os.environ, WORKER_PID: str(os.getpid())}
        argv = [sys.executable, "-m", "convserve.pipelines.tasks"]
        self.proc = subprocess.Popen(argv, env=env)  # its output is the worker's
        log.info("job process %d started", self.proc.pid)

    def interrupt(self) -> None:
        """Stop the job process now (SIGTERM), without waiting for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, graceful: bool, limit: float) -> None:
        """At the worker's exit: ``graceful``, the job process finishes its task first (it got
        SIGINT); else it drains (SIGTERM: its task stops at the next step and goes back to
        the queue), killed after ``limit`` seconds."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if graceful:
            proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C has sent it already
            proc.wait()  # a second SIGINT to the worker stops it at once
            return
        proc.terminate()
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            log.warning("job process %d did not drain in %g s: killed", proc.pid, limit)
            proc.kill()
            proc.wait()
