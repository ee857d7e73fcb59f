"""Shared fixtures (tiny configs that train in about a second, an MLflow store per test, a
tracking server per test process) and the suite's rules: how many processes run it, every
test's time limit scaled by ``CONVSERVE_TEST_SLOWDOWN``, and a run that writes into the
checkout fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from convserve.training.config import TrainConfig
from convserve.training.configfiles import apply_overrides, validate_config

TINY: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "batch_size": 32},
    "model": {"blocks": [{"out_channels": 8}], "hidden": [], "activation": "relu"},
    "init": {"name": "he_normal"},
    "optim": {"optimizer": "adam", "lr": 0.01, "epochs": 1},
    "diagnostics": {"every": 10},
    "tracking": {"enabled": False},
}


def tiny_config(tmp_path: Path, *overrides: str, **sections: Any) -> TrainConfig:
    """The tiny config with ``--set`` style overrides; checkpoints go under ``tmp_path``."""
    data = {**TINY, **sections}
    data = apply_overrides(data, [f"tracking.output_dir={tmp_path / 'runs'}", *overrides])
    return validate_config(data)


@pytest.fixture
def tiny(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(*overrides: str, **sections: Any) -> TrainConfig:
        return tiny_config(tmp_path, *overrides, **sections)

    return make


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real MLflow tracking server process with a SQLite backend, shared by the session."""
    from tests.servers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def postgres_database():  # type: ignore[no-untyped-def]
    """A new database on this machine's PostgreSQL (trust auth), dropped afterwards."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    name = f"convserve_test_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {name}")
    yield name
    conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


@pytest.fixture(autouse=True)
def _tracking_uri_as_it_was():  # type: ignore[no-untyped-def]
    """A test that points MLflow somewhere (``mlflow.set_tracking_uri`` also sets
    ``MLFLOW_TRACKING_URI``) leaves the process, and the processes later tests start, as
    they were."""
    import os

    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    was_set, uri = mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(uri if was_set else None)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# --- the suite's rules ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# What a test run may leave in the checkout: the venv, caches, and the tools `make test`
# installs (.tools/, README "Tests").
MAY_WRITE = {".git", ".venv", ".tools", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
MAY_WRITE_NAMES = {"__pycache__", "convserve.egg-info"}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: ``CONVSERVE_TEST_WORKERS``, else one process per core, and at least two
    (most tests wait on servers and subprocesses more than they compute)."""
    if os.environ.get("CONVSERVE_TEST_WORKERS"):
        return int(os.environ["CONVSERVE_TEST_WORKERS"])
    return max(2, len(os.sched_getaffinity(0)))


def pytest_configure(config: pytest.Config) -> None:
    """In each of several test processes, torch and its subprocesses (workers, ``train``,
    torchrun's ranks) use this process's share of the cores: with more threads than that, an
    OpenMP thread spins waiting for a core that another process holds."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        share = max(1, len(os.sched_getaffinity(0)) // int(workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(share))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests first (``e2e``, then ``slow``; a module's tests stay together), so
    that the parallel processes finish together; every test's time limit (its ``timeout``
    mark, else the ini's) times the slowdown."""
    from tests.waiting import limit

    def weight(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=weight)  # stable: the order within each weight is the collection's

    default = float(config.getini("timeout") or 0)
    for item in items:
        mark = item.get_closest_marker("timeout")
        seconds = float(mark.args[0]) if mark is not None and mark.args else default
        if seconds:
            item.add_marker(pytest.mark.timeout(limit(seconds)), append=False)


def _checkout_files() -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(REPO):
        rel = Path(folder).relative_to(REPO)
        dirs[:] = [
            d
            for d in dirs
            if not (rel == Path(".") and d in MAY_WRITE) and d not in MAY_WRITE_NAMES
        ]
        found.update(str(rel / f) for f in files)
    return found


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # not a pytest-xdist worker


def pytest_sessionstart(session: pytest.Session) -> None:
    if _controller(session.config):
        session.config.stash[_BEFORE] = _checkout_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when it left a new file in the checkout."""
    if not _controller(session.config) or _BEFORE not in session.config.stash:
        return
    new = sorted(_checkout_files() - session.config.stash[_BEFORE])
    if new:
        shown = "\n  ".join(new[:20]) + ("\n  ..." if len(new) > 20 else "")
        session.config.stash[_WROTE] = shown
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _WROTE in config.stash:
        terminalreporter.section("files written into the checkout", sep="=", red=True)
        terminalreporter.line(
            "the tests must write under their tmp_path; the run fails on:\n  "
            + config.stash[_WROTE]
        )


_BEFORE = pytest.StashKey[set[str]]()
_WROTE = pytest.StashKey[str]()
