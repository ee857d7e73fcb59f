"""Running the service under uvicorn with settings objects, one process or several.

``uvicorn.run`` accepts several worker processes only for an import string, which would leave
the settings to travel through the environment. Here the app is built from its settings by
``create_app`` in the supervisor, which then forks uvicorn's worker processes: each starts
with the app, and the pages of everything imported and built before the fork are shared.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import importlib
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from PIL import Image
from prometheus_client import values as prometheus_values
from uvicorn import _subprocess
from uvicorn.config import HTTP_PROTOCOLS, LIFESPAN, LOGGING_CONFIG
from uvicorn.importer import import_from_string
from uvicorn.supervisors import Multiprocess

from convserve.jobs import JobSettings
from convserve.service.api.backends import bound_mlflow_client
from convserve.service.api.docs import assets_dir
from convserve.service.app import create_app
from convserve.service.manager import rss_bytes
from convserve.service.metrics import MULTIPROCESS_DIR, multiprocess_values
from convserve.service.registry import over_rest
from convserve.service.sessions import providers_for, warm_up_cpu
from convserve.service.settings import Settings, available_cores
from convserve.service.wire import OneSendHttpToolsProtocol

log = logging.getLogger("convserve.service")


def log_config() -> dict[str, Any]:
    """uvicorn's logging in convserve's line format (``logs.py``: time, level, logger,
    redacted message; JSON with ``CONVSERVE_LOG_FORMAT=json``), plus the service's own INFO
    lines (model loads and swaps, refused versions) on the same handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter.clear()
        formatter["()"] = "convserve.logs.Formatter"
    config["handlers"]["convserve"] = {
        "formatter": "default",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["convserve"] = {
        "handlers": ["convserve"],
        "level": "INFO",
        "propagate": False,
    }
    # everything else (urllib3, MLflow, Python's warnings) in the same format
    config["root"] = {"handlers": ["convserve"], "level": "WARNING"}
    return config


def run_server(settings: Settings, job_settings: JobSettings) -> None:
    """Serve until interrupted, on ``settings.host:settings.port`` with ``settings.workers``
    processes (0: one per core, see ``Settings.resolved``)."""
    logging.captureWarnings(True)
    bound_mlflow_client()  # this process's MLflow calls are made for requests: bounded
    cuda = "CUDAExecutionProvider" in providers_for(settings.device)
    settings = settings.resolved(cuda)
    if settings.workers == 1:
        uvicorn.Server(_config(settings, job_settings)).run()
        return
    # Forked after the service is imported: a worker starts in milliseconds, not the second a
    # fresh interpreter takes to import it (uvicorn spawns by default). This process starts
    # no thread and keeps no onnxruntime session (preload's is dropped): nothing to inherit
    # badly.
    _subprocess.spawn = multiprocessing.get_context("fork")  # type: ignore[assignment]
    with shared_metrics(), tempfile.TemporaryDirectory(prefix="convserve-peers-") as peers:
        config = _config(settings.model_copy(update={"peers_dir": peers}), job_settings)
        # The workers inherit this process's logging: configured again in each (uvicorn's
        # way, made for fresh interpreters), it would write to every logger object, pages
        # they share with this process (1.3 MB copied by each worker)
        config.log_config = None
        preload(config)
        # The app (its routes, their validators, the OpenAPI models: 2.7 MB of the tree's
        # PSS) made once, here, where the workers share its pages, instead of by each of them.
        # Its metrics' values are made here too: this process writes zeros in its own files
        # of the metrics folder, and a worker's first change starts its own (metrics.py).
        config.load()
        # What the workers inherit goes to the permanent generation first: their collections
        # then never write to the pages they share with this process (copy-on-write).
        gc.freeze()
        _Supervisor(config, sockets=[config.bind_socket()]).run()


def preload(config: uvicorn.Config) -> None:
    """Import here, before the fork, what every worker process would otherwise import on its
    own as it starts and serves: uvicorn's event loop, HTTP protocol and lifespan
    (``Config.load``), anyio's asyncio backend and FastAPI's telemetry (loaded by name on
    first use), Pillow's image formats (the first ``Image.open``), numpy's random generators
    (the batch measurement), the API docs' files, and httpx where the registry is read over
    REST; and onnxruntime's tables of its first CPU session. Imported once, their pages are
    shared by every worker; imported in each, each holds its own copy."""
    if isinstance(config.http, str):
        import_from_string(HTTP_PROTOCOLS.get(config.http, config.http))
    import_from_string(LIFESPAN[config.lifespan])
    config.get_loop_factory()  # imports the loop it picks (uvloop where installed)
    lazy = ["numpy.random", "anyio._backends._asyncio", "fastapi.telemetry._runtime"]
    if over_rest():  # the client, its transport, its TLS roots, a host name's encoding
        lazy += ["httpx", "httpcore", "certifi", "encodings.idna"]
    for name in lazy:
        with contextlib.suppress(ImportError):  # a library's version without it
            importlib.import_module(name)
    Image.preinit()
    assets_dir()
    warm_up_cpu()


class _Supervisor(Multiprocess):
    """uvicorn's process supervisor, which lets go of the listening socket once it has asked
    its workers to stop: the port closes with the last worker's listener (after their drain,
    ``CONVSERVE_SHUTDOWN_DELAY``), so a client connecting then is refused and can go
    elsewhere, where a socket held open by this process alone would queue the connection for
    no one and reset it at the exit. Once every worker serves, it gives back the library pages
    only it maps (``page_out_files``)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets=sockets)
        self.paged_out = False

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        if self.paged_out or self.should_exit.is_set():
            return
        if all(process.is_ready(timeout=1) for process in self.processes):
            self.paged_out = True
            released = page_out_files() / 2**20
            log.info("every worker serves: this process gave back %.1f MB %s", released, PAGED_OUT)

    def terminate_all(self) -> None:
        super().terminate_all()
        for sock in self.sockets:  # the workers keep their own copies until they stop
            sock.close()


MADV_PAGEOUT = 21  # Linux 5.4 and later
PAGED_OUT = "of library pages that only it used"  # the end of the supervisor's line about it


def page_out_files() -> int:
    """Ask the kernel to reclaim the pages of this process's file mappings (its libraries'
    code and read-only data) that no other process maps: in the supervisor, the code it ran
    to import them, which its workers have not run. Pages the workers use are shared and
    stay; a page needed again is read back from its file. Advice, not a change: nothing in
    the process's memory is lost. Returns how much its resident memory shrank, in bytes (0
    where the system takes no such advice)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux, or a /proc without it
        return 0
    before = rss_bytes()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            libc.madvise(start, end - start, MADV_PAGEOUT)  # EINVAL before Linux 5.4
    return max(before - rss_bytes(), 0)


def _config(settings: Settings, job_settings: JobSettings) -> uvicorn.Config:
    config = uvicorn.Config(
        partial(create_app, settings, job_settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        log_config=log_config(),
        access_log=False,
        ws="none",  # no WebSocket route: a worker need not import a WebSocket library
        http=OneSendHttpToolsProtocol,  # each response's head with its body (wire.py)
    )
    cores = available_cores()
    log.info(  # after uvicorn.Config, which configures logging
        "%d worker process%s, %d onnxruntime thread%s each (%d core%s available; "
        "CONVSERVE_WORKERS and CONVSERVE_INTRA_OP_THREADS to change); heavy requests up "
        "to %d units at once each (CONVSERVE_ADMISSION_BUDGET)",
        settings.workers,
        "" if settings.workers == 1 else "es",
        settings.intra_op_threads,
        "" if settings.intra_op_threads == 1 else "s",
        cores,
        "" if cores == 1 else "s",
        settings.admission_budget_units(),
    )
    return config


@contextlib.contextmanager
def shared_metrics() -> Iterator[None]:
    """A fresh folder for the worker processes' metric files (``metrics.py``), removed at the
    end; one named in ``PROMETHEUS_MULTIPROC_DIR`` already is used as it is."""
    given = os.environ.get(MULTIPROCESS_DIR)
    folder = given or tempfile.mkdtemp(prefix="convserve-metrics-")
    os.environ[MULTIPROCESS_DIR] = folder  # inherited by the workers
    # prometheus_client chose its value store when this process imported it; the forked
    # workers inherit that choice, so it is made again now that the folder is set, telling
    # the processes apart by the id each read once (``process_id``)
    single = prometheus_values.ValueClass
    prometheus_values.ValueClass = multiprocess_values()
    try:
        yield
    finally:
        prometheus_values.ValueClass = single
        if not given:
            del os.environ[MULTIPROCESS_DIR]
            shutil.rmtree(folder, ignore_errors=True)
