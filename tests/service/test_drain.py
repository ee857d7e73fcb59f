"""The API drains on SIGTERM: a real ``convserve serve`` of two processes keeps answering,
its ``/readyz`` alone says 503 "draining", for ``CONVSERVE_SHUTDOWN_DELAY`` seconds, so that a
load balancer or a Service stops sending first; then it stops listening, finishes what it
holds and exits."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.servers import free_port, process, wait_http
from tests.waiting import limit, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 90).save(buf, "PNG")
    return buf.getvalue()


def test_sigterm_reports_not_ready_keeps_answering_then_exits(onnx_path, tmp_path):
    delay = 3.0
    port = free_port()
    env = {
        **os.environ,
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_WORKERS": "2",
        "CONVSERVE_SHUTDOWN_DELAY": str(delay),
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_HOST": "127.0.0.1",
    }
    cli = str(Path(sys.executable).parent / "convserve")
    url = f"http://127.0.0.1:{port}"
    image = _png()
    with process([cli, "serve"], tmp_path / "serve.log", env) as proc:
        wait_http(f"{url}/readyz", proc, timeout=90)
        answers: list[int] = []
        errors: list[tuple[float, str]] = []  # (when, what) of a request that got no answer
        stop = threading.Event()

        def load() -> None:  # one client, a new connection per request, until told
            while not stop.is_set():
                try:
                    r = httpx.post(f"{url}/predict", files={"file": ("x.png", image)}, timeout=10)
                    answers.append(r.status_code)
                except httpx.TransportError as err:  # refused, or reset: no answer
                    errors.append((time.monotonic(), repr(err)))
                    if isinstance(err, httpx.ConnectError):
                        return  # the port is closed: the process stopped listening

        client = threading.Thread(target=load)
        client.start()
        wait_until(lambda: len(answers) >= 5, 30, "answers before the signal")
        proc.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        wait_until(
            lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503, 5, "readyz 503"
        )
        body = httpx.get(f"{url}/readyz", timeout=5).json()
        assert body["detail"] == "draining: shutting down"
        during = len(answers)
        wait_until(lambda: len(answers) > during + 5, 5, "answers while draining")
        assert time.monotonic() - asked < delay  # those came within the delay
        proc.wait(timeout=limit(30))
        took = time.monotonic() - asked
        stop.set()
        client.join(timeout=10)
    assert took >= delay, took
    assert set(answers) == {200}, answers
    # every request sent during the drain was answered; the first one refused (or reset in
    # the kernel's queue as the last listener closed) came once the delay was over
    assert errors and all(when >= asked + delay for when, _ in errors), (asked, errors)
    assert "ConnectError" in errors[-1][1], errors
    log = (tmp_path / "serve.log").read_text()
    assert "SIGTERM: draining" in log
