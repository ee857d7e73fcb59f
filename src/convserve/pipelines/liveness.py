"""A worker's liveness file, read by its container health check (``convserve worker
--check``): compose's healthcheck, the trainer image's ``HEALTHCHECK`` and the Kubernetes
probes.

While the worker runs, a thread asks the queue how many tasks wait (a round trip to Redis, or
a read of the SQLite queue) and, when that answers, writes the time into the file. The check
passes while the file is younger than ``CONVSERVE_WORKER_ALIVE_AFTER`` seconds: a worker whose
process hangs, or that has lost its queue for that long, is unhealthy and gets restarted. A
long training job does not stop the thread, so it does not make the worker unhealthy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from convserve.processes import SignalFlag

log = logging.getLogger(__name__)


def keep_alive(
    path: Path, interval: float, probe: Callable[[], object], stop: SignalFlag
) -> threading.Thread:
    """Start a daemon thread that writes ``path`` every ``interval`` seconds while ``probe``
    (a call that reaches the queue) answers, until ``stop`` is set; the file goes then."""

    def beat() -> None:
        while True:
            try:
                probe()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text(f"{time.time():.3f}\n")
                tmp.replace(path)  # a reader never sees a half-written file
            except Exception as err:  # the queue is away: the file ages, the check fails
                log.warning("liveness: %s", err)
            if stop.wait(interval):
                path.unlink(missing_ok=True)
                return

    thread = threading.Thread(target=beat, daemon=True, name="convserve-liveness")
    thread.start()
    return thread


def check(path: Path, alive_after: float) -> str | None:
    """None when the worker wrote ``path`` within ``alive_after`` seconds, else why not."""
    try:
        written = float(path.read_text())
    except FileNotFoundError:
        return f"{path} does not exist: no worker runs here, or it has not started yet"
    except (OSError, ValueError) as err:
        return f"{path} cannot be read: {err}"
    age = time.time() - written
    if age > alive_after:
        return f"the worker's last sign of life is {age:.0f} s old (limit {alive_after:.0f} s)"
    return None
