"""``convserve serve``'s way into the server. The command checks its options and settings,
then runs ``python -m convserve.service`` in its own place (``exec_server``): the server
process then holds none of the command line's own libraries and modules (typer, rich where
nothing else imports it, ``convserve.cli``: 4.3 MB of the idle tree's PSS). Imports nothing of
the service itself, so that the command does not import it twice."""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from convserve.jobs import JobSettings
    from convserve.service.settings import Settings

SETTINGS_FD = "--settings-fd"


def exec_server(settings: Settings, job_settings: JobSettings) -> NoReturn:
    """Run ``python -m convserve.service`` in this process's place (the same process id,
    output and environment) with these settings. They travel pickled in an unlinked file it
    inherits: the API token stays out of the command line and the environment."""
    carrier = tempfile.TemporaryFile()  # noqa: SIM115 (left open for the program that follows)
    pickle.dump((settings, job_settings), carrier)
    carrier.flush()
    os.set_inheritable(carrier.fileno(), True)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "convserve.service", SETTINGS_FD, str(carrier.fileno())]
    os.execv(sys.executable, argv)


def main() -> None:
    """The server, with the settings ``exec_server`` left; the device checked first."""
    if len(sys.argv) != 3 or sys.argv[1] != SETTINGS_FD:
        sys.exit("convserve.service is started by `convserve serve`: run that instead")
    with os.fdopen(int(sys.argv[2]), "rb") as carrier:
        carrier.seek(0)
        settings, job_settings = pickle.load(carrier)
    from convserve.service.server import run_server
    from convserve.service.sessions import ModelLoadError, providers_for

    try:
        providers_for(settings.device)  # CONVSERVE_DEVICE=cuda without CUDA stops here
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    run_server(settings, job_settings)
