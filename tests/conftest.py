"""Shared fixtures: tiny configs that train in about a second, and an MLflow store per test."""

from __future__ import annotations

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
    "diagnostics": {"every": 10, "plots": False},
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
