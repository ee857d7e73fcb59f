"""Running the service under uvicorn with settings objects, one process or several.

``uvicorn.run`` accepts several worker processes only for an import string, which would leave
the settings to travel through the environment. Here the app factory and its settings are
handed to uvicorn's own process supervisor instead: each worker process (started with
``spawn``) receives them pickled and builds its app with ``create_app``.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.supervisors import Multiprocess

from convserve.pipelines.queue import JobSettings
from convserve.service.app import create_app
from convserve.service.model import providers_for
from convserve.service.settings import Settings, available_cores

log = logging.getLogger("convserve.service")


def log_config() -> dict[str, Any]:
    """uvicorn's logging, plus the service's own INFO lines (model loads and swaps, refused
    versions) on the same handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["convserve"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
    }
    config["handlers"]["convserve"] = {
        "formatter": "convserve",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["convserve"] = {
        "handlers": ["convserve"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def run_server(settings: Settings, job_settings: JobSettings) -> None:
    """Serve until interrupted, on ``settings.host:settings.port`` with ``settings.workers``
    processes (0: one per core, see ``Settings.resolved``)."""
    cuda = "CUDAExecutionProvider" in providers_for(settings.device)
    settings = settings.resolved(cuda)
    config = uvicorn.Config(
        partial(create_app, settings, job_settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        log_config=log_config(),
        access_log=False,
    )
    log.info(  # after uvicorn.Config, which configures logging
        "%d worker process%s, %d onnxruntime thread%s each (%d core%s available; "
        "CONVSERVE_WORKERS and CONVSERVE_INTRA_OP_THREADS to change)",
        settings.workers,
        "" if settings.workers == 1 else "es",
        settings.intra_op_threads,
        "" if settings.intra_op_threads == 1 else "s",
        available_cores(),
        "" if available_cores() == 1 else "s",
    )
    server = uvicorn.Server(config)
    if settings.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()
