"""Shadow runs in the challenger's own process (service/shadow.py): the real child process
and onnxruntime on an exported model; what it answers counted as the champion's and the
challenger's agreement, confidences and times."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from convserve import contract
from convserve.service import shadow
from convserve.service.model import Source
from convserve.service.rollout import Live


def _batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def _probs(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([contract.PROBABILITIES], {contract.INPUT: batch})[0]  # type: ignore[no-any-return]


def _source(path: Path) -> Source:
    return Source("models:/digits/2", "digits", version="2", path=path)


def test_shadowed_requests_run_in_the_challengers_process_and_are_counted(onnx_path):
    batches = [_batch(n, seed) for seed, n in enumerate((1, 3, 2, 5))]
    # the champion's answers: the model's own for the first two, another class for the rest
    champion = [_probs(onnx_path, b) for b in batches[:2]]
    champion += [np.roll(_probs(onnx_path, b), 1, axis=1) for b in batches[2:]]

    async def run() -> tuple[Live, set[int]]:
        shadows, live = shadow.Shadows(), Live()
        for batch, probs in zip(batches, champion, strict=True):
            item = shadow.Item(batch, probs, champion_image_seconds=0.001)
            shadows.add(_source(onnx_path), live, item)
        await shadows.done()
        pids = {r._proc.pid for r in shadows.runners.values() if r._proc is not None}
        await shadows.close()
        return live, pids

    live, pids = asyncio.run(run())
    assert len(pids) == 1
    window = live.take()
    assert window.requests == 11 and window.failures == 0 and window.skipped == 0
    assert window.agree == 4  # the first two requests' images: the same model answered
    tops = np.concatenate([_probs(onnx_path, b) for b in batches]).max(1)
    assert window.challenger_confidence == pytest.approx(float(tops.sum()), rel=1e-5)
    assert window.champion_seconds == pytest.approx(0.011)
    assert window.challenger_seconds > 0
    # what /v1/models shows: the counts as integers, the means over the shadowed images
    shown = live.snapshot()
    counts = {k: shown[k] for k in ("shadowed", "canary", "skipped", "failures")}
    assert counts == {"shadowed": 11, "canary": 0, "skipped": 0, "failures": 0}
    assert all(type(v) is int for v in counts.values())
    assert shown["agreement"] == pytest.approx(4 / 11, abs=1e-4)
    assert shown["champion_ms"] == pytest.approx(1.0)


def test_a_challenger_that_cannot_load_or_run_counts_failures_and_nothing_crashes(
    onnx_path, tmp_path, caplog
):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")

    async def run() -> tuple[Live, Live, str | None]:
        shadows, bad, good = shadow.Shadows(), Live(), Live()
        probs = np.full((2, 10), 0.1, dtype=np.float32)
        source = Source("models:/broken/1", "broken", version="1", path=broken)
        shadows.add(source, bad, shadow.Item(_batch(2, 0), probs, 0.001))
        # a batch the model refuses (28x28 where it takes 8x8), then one it takes
        wrong = np.zeros((2, 1, 28, 28), dtype=np.float32)
        shadows.add(_source(onnx_path), good, shadow.Item(wrong, probs, 0.001))
        shadows.flush()
        shadows.add(_source(onnx_path), good, shadow.Item(_batch(2, 1), probs, 0.001))
        await shadows.done()
        failed = shadows.runners["broken"].failed
        await shadows.close()
        return bad, good, failed

    bad, good, failed = asyncio.run(run())
    assert bad.take().failures == 2
    assert failed is not None and "ended: exit status 2" in failed
    window = good.take()
    assert window.failures == 2 and window.requests == 2
    assert "Got invalid dimensions" in caplog.text


def test_a_challenger_far_behind_or_a_request_too_large_skips_and_a_retired_one_runs_its_queue(
    onnx_path,
):
    probs = np.full((1, 10), 0.1, dtype=np.float32)

    async def behind() -> Live:
        shadows, live = shadow.Shadows(), Live()
        # flushed one by one before the process is up: BACKLOG batches wait, the rest skip
        for seed in range(shadow.BACKLOG + 3):
            assert shadows.behind(_source(onnx_path)) == (seed >= shadow.BACKLOG)
            item = shadow.Item(_batch(1, seed), probs, 0.001)
            shadows.add(_source(onnx_path), live, item)
            shadows.flush()
        await shadows.close()
        return live

    async def retired() -> Live:
        shadows, live = shadow.Shadows(), Live()
        for seed in range(3):  # queued, not yet flushed, when the challenger goes
            item = shadow.Item(_batch(1, seed), probs, 0.001)
            shadows.add(_source(onnx_path), live, item)
        await shadows.retire("digits")
        assert not shadows.runners and not shadows.under_way("digits", "2")
        return live

    async def too_large() -> Live:
        shadows, live = shadow.Shadows(), Live()
        images = shadow.SLOT_BYTES // (8 * 8 * 4) + 1
        item = shadow.Item(_batch(images, 0), np.full((images, 10), 0.1, np.float32), 0.001)
        shadows.add(_source(onnx_path), live, item)
        await shadows.close()
        return live

    window = asyncio.run(behind()).take()
    assert (window.requests, window.skipped, window.failures) == (shadow.BACKLOG, 3, 0)
    window = asyncio.run(retired()).take()
    assert (window.requests, window.skipped, window.failures) == (3, 0, 0)
    window = asyncio.run(too_large()).take()
    assert (window.requests, window.skipped) == (0, shadow.SLOT_BYTES // 256 + 1)


def test_a_shadow_process_that_dies_is_counted_then_started_again(onnx_path, monkeypatch):
    probs = np.full((2, 10), 0.1, dtype=np.float32)

    def item(seed: int) -> shadow.Item:
        return shadow.Item(_batch(2, seed), probs, 0.001)

    async def run() -> tuple[Live, str | None, int, int]:
        shadows, live = shadow.Shadows(), Live()
        shadows.add(_source(onnx_path), live, item(0))
        await shadows.done()
        first = shadows.runners["digits"]
        assert first._proc is not None
        os.kill(first._proc.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        for _ in range(500):  # the reader sees its end of file
            if first.failed is not None:
                break
            await asyncio.sleep(0.01)
        monkeypatch.setattr(shadow, "RESTART_SECONDS", 3600.0)
        shadows.add(_source(onnx_path), live, item(1))  # not yet: a failure
        monkeypatch.setattr(shadow, "RESTART_SECONDS", 0.0)
        shadows.add(_source(onnx_path), live, item(2))  # a new process answers
        await shadows.done()
        second = shadows.runners["digits"]
        pids = first._proc.pid, second._proc.pid if second._proc else 0
        await shadows.close()
        return live, first.failed, *pids

    live, failed, first_pid, second_pid = asyncio.run(run())
    assert failed is not None and "exit status -9" in failed
    assert second_pid and second_pid != first_pid
    window = live.take()
    assert (window.requests, window.failures) == (4, 2)


def test_a_shadowed_answer_is_sent_before_its_images_go_to_the_challenger(onnx_path, monkeypatch):
    """``Catalog.shadow_after``: the response's body goes out first, then the copy to the
    challenger's process, on the event loop."""
    from starlette.responses import Response

    from convserve.service.catalog import Catalog
    from convserve.service.metrics import Metrics
    from convserve.service.settings import Settings

    catalog = Catalog(Settings(model_uri=str(onnx_path), models=""), Metrics())
    events: list[str] = []

    def add(*args: object) -> None:
        asyncio.get_running_loop()  # on the event loop, not in a thread
        events.append("shadowed")

    monkeypatch.setattr(catalog.shadows, "add", add)
    champion = SimpleNamespace(image_seconds=0.001)
    challenger = SimpleNamespace(model=SimpleNamespace(source=_source(onnx_path)))
    batch, probs = _batch(1, 0), np.full((1, 10), 0.1, dtype=np.float32)
    response = catalog.shadow_after(Response(b"{}"), champion, challenger, batch, probs)  # type: ignore[arg-type]

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        events.append(str(message["type"]))

    asyncio.run(response({"type": "http", "method": "POST"}, receive, send))  # type: ignore[arg-type]
    assert events == ["http.response.start", "http.response.body", "shadowed"]
    catalog.executor.shutdown()


def test_a_request_the_challenger_is_too_far_behind_for_is_skipped_before_its_answer_goes(
    onnx_path,
):
    """``Catalog.shadow_after`` with the challenger's process ``BACKLOG`` batches behind:
    the response carries nothing to run after its body, and the request is counted skipped."""
    from starlette.responses import Response

    from convserve.service.catalog import Catalog
    from convserve.service.metrics import Metrics
    from convserve.service.settings import Settings

    catalog = Catalog(Settings(model_uri=str(onnx_path), models=""), Metrics())
    champion = SimpleNamespace(image_seconds=0.001)
    challenger = SimpleNamespace(model=SimpleNamespace(source=_source(onnx_path)))
    probs = np.full((2, 10), 0.1, dtype=np.float32)

    async def run() -> list[Response]:
        responses = []
        for seed in range(shadow.BACKLOG + 2):  # flushed before the process is up
            batch = _batch(2, seed)
            response = catalog.shadow_after(Response(b"{}"), champion, challenger, batch, probs)  # type: ignore[arg-type]
            if response.background is not None:
                await response.background()
            catalog.shadows.flush()
            responses.append(response)
        await catalog.shadows.close()
        return responses

    responses = asyncio.run(run())
    assert [r.background is None for r in responses] == [False] * shadow.BACKLOG + [True] * 2
    window = catalog.live[("digits", "2")].take()
    assert (window.requests, window.skipped, window.failures) == (2 * shadow.BACKLOG, 4, 0)
    catalog.executor.shutdown()


def test_every_counted_window_reaches_the_challengers_run(onnx_path, mlflow_url, monkeypatch):
    """A window in which every shadowed image was skipped is logged as such, and one that
    could not be logged (the registry down) is kept for the next log, even once its
    challenger is retired: ``convserve promote`` weighs what every request came to."""
    from mlflow import MlflowClient

    from convserve.service.catalog import Catalog
    from convserve.service.metrics import Metrics
    from convserve.service.registry import registry_for
    from convserve.service.rollout import evidence
    from convserve.service.settings import Settings
    from tests.servers import free_port

    run_id = MlflowClient(mlflow_url).create_run("0").info.run_id
    key = ("retired", "3")  # a challenger no longer followed: logged, then forgotten
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # down
    catalog = Catalog(Settings(model_uri=str(onnx_path), models=""), Metrics())
    catalog.live[key] = Live(run_id=run_id)
    catalog.live[key].count(skipped=3)
    asyncio.run(catalog.log_live_now())
    assert catalog.live[key].pending.skipped == 3  # kept for the next log
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    catalog.default._client = None  # the registry read again, now up
    asyncio.run(catalog.log_live_now())
    assert key not in catalog.live
    seen = evidence(registry_for(mlflow_url), run_id)
    assert (seen.requests, seen.skipped, seen.canary) == (0, 3, 0)
    catalog.executor.shutdown()
