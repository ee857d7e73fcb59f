"""Running the service under uvicorn with settings objects, one process or several.

``uvicorn.run`` accepts several worker processes only for an import string, which would leave
the settings to travel through the environment. Here the app factory and its settings are
handed to uvicorn's own process supervisor instead: each worker process (started with
``spawn``) receives them pickled and builds its app with ``create_app``.
"""

from __future__ import annotations

from functools import partial

import uvicorn
from uvicorn.supervisors import Multiprocess

from convserve.pipelines.queue import JobSettings
from convserve.service.app import create_app
from convserve.service.settings import Settings


def run_server(settings: Settings, job_settings: JobSettings) -> None:
    """Serve until interrupted, on ``settings.host:settings.port`` with ``settings.workers``
    processes."""
    config = uvicorn.Config(
        partial(create_app, settings, job_settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        access_log=False,
    )
    server = uvicorn.Server(config)
    if settings.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()
