"""The ``convserve`` command line: parses options into settings and configs and calls the
packages below it (``service``, ``pipelines``, ``training``). One module per command group:
``training`` (train, sweep, export, experiments), ``stack`` (serve, worker, up, bootstrap) and
``data`` (add, list, show, delete).
"""

from convserve.cli import data, stack, training  # noqa: F401  (each module registers its commands)
from convserve.cli.app import app

__all__ = ["app"]
