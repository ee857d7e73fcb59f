"""The worker's liveness file and its check (``convserve worker --check``)."""

from __future__ import annotations

import os
import threading
import time

from typer.testing import CliRunner

from convserve.cli import app
from convserve.pipelines.liveness import check, keep_alive
from tests.waiting import wait_until


def test_the_file_is_written_while_the_queue_answers_and_goes_when_the_worker_stops(tmp_path):
    path = tmp_path / "state" / "worker.alive"
    stop = threading.Event()
    thread = keep_alive(path, 0.05, lambda: 0, stop)
    wait_until(path.exists, 10, "the liveness file", 0.02)
    assert check(path, alive_after=5) is None
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and not path.exists()
    assert "does not exist" in check(path, alive_after=5)


def test_a_queue_that_does_not_answer_lets_the_file_age(tmp_path):
    path = tmp_path / "worker.alive"
    calls = []

    def away() -> None:
        calls.append(1)
        raise ConnectionError("redis is away")

    stop = threading.Event()
    thread = keep_alive(path, 0.02, away, stop)
    wait_until(lambda: len(calls) >= 3, 10, "three beats", 0.02)
    stop.set()
    thread.join(5)
    assert not path.exists()


def test_an_old_or_unreadable_file_fails_the_check(tmp_path):
    path = tmp_path / "worker.alive"
    path.write_text(f"{time.time() - 120:.3f}\n")
    assert "120 s old (limit 60 s)" in check(path, alive_after=60)
    path.write_text("not a time")
    assert "cannot be read" in check(path, alive_after=60)


def test_the_command_exits_0_for_a_live_worker_and_1_otherwise(tmp_path, monkeypatch):
    path = tmp_path / "worker.alive"
    monkeypatch.setenv("CONVSERVE_WORKER_LIVENESS_FILE", str(path))
    runner = CliRunner()
    missing = runner.invoke(app, ["worker", "--check"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    path.write_text(f"{time.time():.3f}\n")
    alive = runner.invoke(app, ["worker", "--check"])
    assert alive.exit_code == 0 and "alive" in alive.output
    old = time.time() - 100
    path.write_text(f"{old:.3f}\n")
    os.utime(path, (old, old))
    monkeypatch.setenv("CONVSERVE_WORKER_ALIVE_AFTER", "30")
    assert runner.invoke(app, ["worker", "--check"]).exit_code == 1
