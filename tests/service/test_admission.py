"""Admission control: a request's cost is known before its work starts; heavy requests over
a process's budget wait briefly, then are answered 503 with Retry-After and the reason, and
their decoding, inference and encoding run in the heavy thread, never on the event loop."""

import asyncio
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from convserve.service import admission, features
from convserve.service.admission import Admission
from convserve.service.app import create_app
from convserve.service.settings import Settings
from tests.servers import uvicorn_server


def _png(level: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), level).save(buf, "PNG")
    return buf.getvalue()


def test_light_requests_pass_and_heavy_ones_wait_then_are_refused():
    async def scenario() -> None:
        gate = Admission(budget=100, wait=0.2)
        async with gate.admitted(admission.LIGHT_COST, "light") as heavy:
            assert heavy is False and gate.in_flight == 0
        async with gate.admitted(500, "alone") as heavy:  # over budget, but alone: admitted
            assert heavy is True and gate.in_flight == 500
            with pytest.raises(HTTPException) as refused:
                async with gate.admitted(50, "64 images"):
                    pass
            assert refused.value.status_code == 503
            assert refused.value.headers == {"Retry-After": "1"}
            assert "64 images" in refused.value.detail and "CONVSERVE_ADMISSION_BUDGET" in (
                refused.value.detail
            )
        assert gate.in_flight == 0
        # a waiting request is admitted as soon as the one in flight ends
        order = []

        async def first() -> None:
            async with gate.admitted(80, "first"):
                await asyncio.sleep(0.05)
                order.append("first done")

        async def second() -> None:
            await asyncio.sleep(0.01)
            async with gate.admitted(80, "second"):
                order.append("second admitted")

        await asyncio.gather(first(), second())
        assert order == ["first done", "second admitted"]

    asyncio.run(scenario())


def test_the_budget_follows_threads_and_memory():
    assert admission.auto_budget(1, 2) == min(
        admission.UNITS_PER_THREAD,
        admission.auto_budget(64, 2),  # capped by memory at some thread count
    )
    assert admission.auto_budget(2, 1) >= admission.auto_budget(1, 1)
    assert Settings(admission_budget=77).admission_budget_units() == 77


def test_heavy_work_runs_in_the_heavy_thread(onnx_path, monkeypatch):
    """Feature maps, of 16 images or of one: rendered in the heavy thread, not the event
    loop's."""
    threads = set()
    render = features.render_values

    def recording(fmap: np.ndarray, fmt: str) -> dict:
        threads.add(threading.current_thread().name)
        return render(fmap, fmt)

    monkeypatch.setattr(features, "render_values", recording)
    settings = Settings(model_uri=str(onnx_path), poll_interval=3600)
    with TestClient(create_app(settings)) as client:
        files = [("files", (f"{i}.png", _png(i * 10), "image/png")) for i in range(16)]
        r = client.post("/predict?feature_maps=all&format=array", files=files)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 16
        assert {name.rsplit("_", 1)[0] for name in threads} == {"convserve-heavy"}
        threads.clear()  # any feature map, even one image's stats, is rendered there
        one = client.post("/predict?feature_maps=block1&format=stats", files=files[:1])
        assert one.status_code == 200
        assert {name.rsplit("_", 1)[0] for name in threads} == {"convserve-heavy"}


def test_a_v2_request_s_json_is_parsed_off_the_event_loop_only_when_it_is_large(
    onnx_path, monkeypatch
):
    """A tensor of values (over 64 KB of JSON) is parsed in the heavy thread; the short JSON
    in front of as many bytes of binary tensor data, on the event loop: the body's size is
    not the parse's."""
    from convserve.service.api import v2

    threads = []
    parse = v2._parse

    def recording(text: bytes) -> object:
        threads.append(threading.current_thread().name)
        return parse(text)

    monkeypatch.setattr(v2, "_parse", recording)
    images = np.linspace(0, 1, 300 * 64, dtype=np.float32).reshape(300, 1, 8, 8)
    tensor = {"name": "image", "shape": list(images.shape), "datatype": "FP32"}
    values = {"inputs": [{**tensor, "data": images.ravel().tolist()}]}
    raw = images.tobytes()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]})
    assert len(json.dumps(values)) > v2.INLINE_JSON_BYTES and len(raw) > v2.INLINE_JSON_BYTES
    settings = Settings(model_uri=str(onnx_path), poll_interval=3600)
    with TestClient(create_app(settings)) as client:
        as_values = client.post("/v2/models/model/infer", json=values)
        as_bytes = client.post(
            "/v2/models/model/infer",
            content=header.encode() + raw,
            headers={v2.HEADER_LENGTH: str(len(header))},
        )
    assert as_values.status_code == as_bytes.status_code == 200, as_bytes.text
    assert as_bytes.json()["outputs"] == as_values.json()["outputs"]
    heavy = [name.startswith("convserve-heavy") for name in threads]
    assert heavy == [True, False], threads


def test_over_budget_requests_are_refused_and_light_ones_still_answered(onnx_path, tmp_path):
    """A budget of one heavy request: eight clients asking for feature maps of 32 images at
    once; those over it are answered 503 with Retry-After, while /healthz and a plain
    /predict answer 200 throughout, over HTTP v2 as on /predict."""
    env = {
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_ADMISSION_BUDGET": "10",
        "CONVSERVE_ADMISSION_WAIT": "0",
        "CONVSERVE_MAX_FILES": "64",
    }
    files = [("files", (f"{i}.png", _png(i), "image/png")) for i in range(32)]
    with uvicorn_server(env, tmp_path) as url:

        def heavy(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as http:
                return http.post("/predict?feature_maps=all&format=array", files=files)

        def infer(_: int) -> httpx.Response:
            data = np.zeros((256, 1, 8, 8), np.float32)
            body = {"inputs": [{"name": "image", "shape": list(data.shape),
                                "datatype": "FP32", "data": data.ravel().tolist()}]}  # fmt: skip
            return httpx.post(f"{url}/v2/models/model/infer", json=body, timeout=60)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(heavy, range(8))) + list(pool.map(infer, range(8)))
            light = httpx.post(f"{url}/predict", files={"file": ("x.png", _png())}, timeout=10)
            assert light.status_code == 200
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 503}, codes
        refused = next(a for a in answers[:8] if a.status_code == 503)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["detail"].startswith("busy: ")
        refused_v2 = [a for a in answers[8:] if a.status_code == 503]
        assert all(a.json()["error"].startswith("busy: ") for a in refused_v2)
