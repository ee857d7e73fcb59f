"""The API in process (FastAPI's TestClient runs the real app, lifespan and onnxruntime)."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from convserve.service.app import create_app
from convserve.service.settings import Settings


def _png(value: int = 128, size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def client(onnx_path):
    settings = Settings(
        model_uri=str(onnx_path), api_token="s3cret", max_upload_bytes=200_000, poll_interval=3600
    )
    with TestClient(create_app(settings)) as c:
        yield c


NO_TORCH = """
import json, sys
from fastapi.testclient import TestClient
from convserve.service.app import create_app
from convserve.service.settings import Settings
from convserve.jobs import JobSettings

args = json.loads(sys.argv[1])
app = create_app(
    Settings(model_uri=args["model"], api_token="t"),
    JobSettings(queue_path=args["queue"]),
)
auth = {"Authorization": "Bearer t"}
with TestClient(app) as c:
    assert c.get("/readyz").status_code == 200
    png = {"file": ("x.png", args["png"].encode("latin-1"))}
    assert c.post("/predict", files=png).status_code == 200
    for body in args["bodies"]:
        r = c.post("/jobs", json=body, headers=auth)
        assert r.status_code == 202, r.text
        assert c.get("/jobs/" + r.json()["id"]).json()["status"] == "scheduled"
        assert c.delete("/jobs/" + r.json()["id"], headers=auth).json()["status"] == "cancelled"
    assert len(c.get("/jobs").json()["jobs"]) == len(args["bodies"])
print("torch" in sys.modules)
"""


def test_service_never_imports_torch(onnx_path, tmp_path):
    """Start-up, a prediction, and a training job and a sweep submitted, read and cancelled:
    the API process never imports torch."""
    from tests.conftest import TINY

    bodies = [
        {"train": TINY},
        {"sweep": {"base": TINY, "grid": {"init.name": ["xavier_uniform", "he_normal"]}}},
    ]
    args = {
        "model": str(onnx_path),
        "queue": str(tmp_path / "queue.db"),
        "png": _png().decode("latin-1"),
        "bodies": bodies,
    }
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    assert _fresh_python(NO_TORCH, args, tmp_path, env) == "False"


def _fresh_python(script: str, args: dict, cwd, env=None) -> str:  # type: ignore[no-untyped-def]
    """The last line ``script`` prints, run in a new interpreter with ``args`` as JSON in
    ``sys.argv[1]`` (nothing imported before it: what it imports is its own); it must exit 0."""
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


SERVING_IMPORTS = """
import json, sys
from fastapi.testclient import TestClient
import convserve.cli
from convserve.service.app import create_app
from convserve.service.settings import Settings

args = json.loads(sys.argv[1])
with TestClient(create_app(Settings(model_uri=args["model"]))) as c:
    png = {"file": ("x.png", args["png"].encode("latin-1"))}
    assert c.post("/predict", files=png).status_code == 200
    r = c.post("/v2/models/model/infer", json=args["v2"])
    assert r.status_code == 200, r.text
print(json.dumps(sorted(m for m in args["unused"] if m in sys.modules)))
"""
# What a serving process has no use for, left to the commands and routes that need it
UNUSED_WHILE_SERVING = ["torch", "mlflow", "huey", "redis", "yaml", "websockets", "rich.logging"]


def test_a_serving_process_imports_only_what_serving_uses(onnx_path, tmp_path):
    """The command line, the app and its start-up, a prediction on each protocol: none of
    these imports the libraries of training, jobs, config files or WebSockets (each one
    costs the first answer milliseconds, and memory in every worker)."""
    v2 = {
        "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]
    }
    args = {
        "model": str(onnx_path),
        "png": _png().decode("latin-1"),
        "v2": v2,
        "unused": UNUSED_WHILE_SERVING,
    }
    assert json.loads(_fresh_python(SERVING_IMPORTS, args, tmp_path)) == []


def test_predict_one_image(client):
    r = client.post(
        "/predict", files={"file": ("seven.png", _png(), "image/png")}, params={"top_k": 3}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "model", "version": "file"}  # a file, no run tracked
    assert body["request_id"] == r.headers["x-request-id"]
    (pred,) = body["predictions"]
    assert pred["filename"] == "seven.png" and len(pred["top_k"]) == 3
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    probs = [t["probability"] for t in pred["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert pred["top_k"][0]["label"] == str(pred["top_k"][0]["index"])
    assert body["time"]["total_ms"] > 0 and "feature_maps" not in pred


def test_several_images_answered_in_order(client):
    files = [("files", (f"{v}.png", _png(v), "image/png")) for v in (0, 255, 90)]
    body = client.post("/predict", files=files).json()
    assert [p["filename"] for p in body["predictions"]] == ["0.png", "255.png", "90.png"]
    alone = client.post("/predict", files={"file": ("x.png", _png(255), "image/png")}).json()
    assert body["predictions"][1]["probabilities"] == pytest.approx(
        alone["predictions"][0]["probabilities"], abs=1e-6
    )


def test_feature_maps_in_three_formats(client):
    f = {"file": ("x.png", _png(), "image/png")}
    png = client.post("/predict", files=f, params={"feature_maps": "all"}).json()
    maps = png["predictions"][0]["feature_maps"]
    assert set(maps) == {"block1", "block2"}
    grid = maps["block1"]["grid"]
    assert (grid["rows"], grid["cols"], grid["channels"]) == (2, 3, 6)
    image = Image.open(io.BytesIO(base64.b64decode(maps["block1"]["png"])))
    assert image.size == (3 * 8, 2 * 8)
    arr = client.post("/predict", files=f, params={"feature_maps": "block2", "format": "array"})
    data = np.asarray(arr.json()["predictions"][0]["feature_maps"]["block2"]["data"])
    assert data.shape == (8, 4, 4)
    stats = client.post(
        "/predict", files=f, params={"feature_maps": "block2", "format": "stats"}
    ).json()
    s = stats["predictions"][0]["feature_maps"]["block2"]
    assert np.allclose(s["mean"], data.mean(axis=(1, 2)), atol=1e-5)
    assert np.allclose(s["max"], data.max(axis=(1, 2)), atol=1e-5)


def test_unknown_block_lists_the_valid_ones(client):
    r = client.post(
        "/predict",
        files={"file": ("x.png", _png(), "image/png")},
        params={"feature_maps": "block1,block7"},
    )
    assert r.status_code == 422 and "block7" in r.json()["detail"]
    assert "valid: block1, block2" in r.json()["detail"]


def test_oversized_response_says_how_to_ask_for_less(onnx_path):
    settings = Settings(model_uri=str(onnx_path), max_response_bytes=2048)
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/predict",
            files={"file": ("x.png", _png(), "image/png")},
            params={"feature_maps": "all", "format": "array"},
        )
        assert r.status_code == 422 and "format=stats" in r.json()["detail"]


def test_no_model_is_503_with_how_to_train_one(tmp_path):
    settings = Settings(model_uri=str(tmp_path / "missing.onnx"), poll_interval=3600)
    with TestClient(create_app(settings)) as c:
        r = c.post("/predict", files={"file": ("x.png", _png(), "image/png")})
        assert r.status_code == 503 and "convserve train" in r.json()["detail"]
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200


def test_model_info_health_and_metrics(client):
    info = client.get("/v1/model").json()
    assert info["labels"] == [str(i) for i in range(10)]
    assert info["input"]["shape"] == [-1, 1, 8, 8]
    assert info["feature_outputs"] == {"block1": [6, 8, 8], "block2": [8, 4, 4]}
    assert info["providers"] == ["CPUExecutionProvider"] and info["opset"] == 18
    assert client.get("/readyz").json()["status"] == "ready"
    client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
    client.post("/predict", files={"file": ("x.png", b"junk", "image/png")})
    text = client.get("/metrics").text
    assert 'convserve_http_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'convserve_http_requests_total{method="POST",route="/predict",status="422"}' in text
    for name in (
        "convserve_inference_batch_size_bucket",
        "convserve_model_info{",
        "convserve_inference_queue_duration_seconds_bucket",
        "convserve_inference_compute_duration_seconds_bucket",
        "convserve_model_reloads_total 1.0",
        "convserve_model_refused_total 0.0",
        "convserve_http_request_duration_seconds_bucket",
    ):
        assert name in text, name


def test_admin_reload_needs_the_token(client):
    assert client.post("/admin/reload").status_code == 401
    r = client.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json()["changed"] is False
    r = client.post(
        "/admin/reload", params={"force": True}, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.json()["changed"] is True


def test_upload_limit_is_413(client):
    big = b"\x89PNG" + b"0" * 300_000
    r = client.post("/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "CONVSERVE_MAX_UPLOAD_BYTES" in r.json()["detail"]
    assert client.get("/readyz").status_code == 200


def test_cuda_without_a_gpu_fails_at_start(onnx_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA provider"):
        create_app(Settings(model_uri=str(onnx_path), device="cuda"))


def test_the_answer_says_how_the_input_was_fitted(client):
    from tests.service.digits import stroke_digit

    buf = io.BytesIO()
    stroke_digit(7, (30, 10, 120, 180), 12, light=True).save(buf, "PNG")
    f = {"file": ("seven.png", buf.getvalue(), "image/png")}
    fitted = client.post("/predict", files=f).json()["predictions"][0]["input"]
    assert fitted["original"] == "200x200 L" and fitted["format"] == "PNG"
    assert fitted["fit"] == "digit"  # the digits model's metadata asks for it
    assert fitted["steps"][0].startswith("inverted") and "centred by box in 8x8" in fitted["steps"]
    plain = client.post("/predict", files=f, params={"fit": "none"}).json()
    assert plain["predictions"][0]["input"]["fit"] == "stretch"
    assert plain["predictions"][0]["input"]["steps"] == ["stretched 200x200 to 8x8"]
    assert client.post("/predict", files=f, params={"fit": "crop"}).status_code == 422


def _every_mode() -> list:
    """One upload in each colour mode Pillow opens, in a format that stores it."""
    gradient = Image.linear_gradient("L").resize((16, 12))
    images = {m: gradient.convert(m) for m in ("1", "L", "LA", "RGB", "RGBA", "CMYK", "YCbCr")}
    images["P"] = gradient.convert("RGB").convert("P")
    transparent = images["P"].copy()
    transparent.info["transparency"] = 0
    images["P+transparency"] = transparent
    neutral = Image.new("L", gradient.size, 128)
    images["LAB"] = Image.merge("LAB", (gradient, neutral, neutral))
    # (HSV: no image format stores it, so no upload arrives in it)
    images["I"] = gradient.convert("I")
    images["F"] = Image.fromarray(np.asarray(gradient, np.float32) / 255.0)
    sixteen = np.asarray(gradient, np.uint16) * 257
    images["I;16"] = Image.fromarray(sixteen)
    images["I;16B"] = Image.frombytes("I;16B", gradient.size, sixteen.astype(">u2").tobytes())
    out = []
    for name, image in images.items():
        for fmt in ("PNG", "TIFF", "WEBP", "JPEG"):  # the first format that stores the mode
            buf = io.BytesIO()
            try:
                image.save(buf, fmt)
            except (OSError, ValueError, KeyError):
                continue
            if Image.open(io.BytesIO(buf.getvalue())).mode == image.mode:
                out.append(pytest.param(name, fmt, buf.getvalue(), id=f"{name}-{fmt}"))
                break
        else:
            raise AssertionError(f"no format stores mode {name}")
    return out


@pytest.mark.parametrize(("mode", "fmt", "data"), _every_mode())
def test_every_colour_mode_answers_200_or_a_422_naming_it(client, mode, fmt, data):
    r = client.post("/predict", files={"file": ("x", data)}, params={"fit": "none"})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert mode.split("+")[0] in r.json()["detail"]
    else:
        assert r.json()["predictions"][0]["input"]["format"] == fmt


def test_request_ids_are_unique_and_uuid_sized():
    from convserve.service.api.deps import new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_wrong_method_is_answered_405_with_the_methods_the_path_takes(client):
    for method, path, allowed in [
        ("PUT", "/predict", "POST"),
        ("POST", "/healthz", "GET"),
        ("PUT", "/jobs", "GET, POST"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allowed, (method, path)


def test_predict_is_served_directly_and_its_failures_answer_500_and_not_the_server(
    client, monkeypatch, caplog
):
    """POST /predict skips FastAPI's routing (``Service.serve_directly``): the declared route's
    endpoint answers, its errors go through the app's handlers, an unexpected one is a logged
    500, and the next request is served."""
    from convserve.service.api import predict

    app = client.app
    route, _ = app._direct[("POST", "/predict")]
    assert route.endpoint is predict.predict and route.path == "/predict"

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(predict, "_prediction", broken)
    with caplog.at_level("ERROR", logger="convserve.service.direct"):
        r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert r.headers["x-request-id"] and "POST /predict failed" in caplog.text
    monkeypatch.undo()
    ok = client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["top_k"]
    text = client.get("/metrics").text
    assert 'convserve_http_requests_total{method="POST",route="/predict",status="500"} 1.0' in text
    r = client.post("/predict", params={"top_k": 0}, files={"file": ("x.png", _png())})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "top_k"]


def test_v2_infer_is_served_directly_with_its_path_parameters(client, monkeypatch, caplog):
    """The v2 infer routes skip FastAPI's routing too (``Service.serve_directly`` matches a
    path with parameters by its pattern): the declared endpoints answer with the name and
    version of the path, errors are the protocol's, an unexpected one is a logged 500, another
    method is FastAPI's 405, and requests are counted by route. Under a proxy's root path
    FastAPI's router serves them, with the same answer."""
    from convserve.service.api import v2

    app = client.app
    routes = {path: route for (_, path), (route, _) in app._direct.items()}
    assert routes["/v2/models/{name}/infer"].endpoint is v2.infer
    assert routes["/v2/models/{name}/versions/{version}/infer"].endpoint is v2.infer_version
    tensor = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    ok = client.post("/v2/models/model/infer", json={"inputs": [tensor]})
    assert ok.status_code == 200, ok.text
    version = ok.json()["model_version"]
    assert ok.json()["model_name"] == "model"
    pinned = client.post(f"/v2/models/model/versions/{version}/infer", json={"inputs": [tensor]})
    assert pinned.status_code == 200 and pinned.json()["outputs"] == ok.json()["outputs"]
    proxied = TestClient(app, root_path="/api").post(
        "/api/v2/models/model/infer", json={"inputs": [tensor]}
    )
    assert proxied.status_code == 200 and proxied.json()["outputs"] == ok.json()["outputs"]
    other = client.post("/v2/models/other/infer", json={"inputs": [tensor]})
    assert other.status_code == 404 and "other" in other.json()["error"]
    unserved = client.post("/v2/models/model/versions/7/infer", json={"inputs": [tensor]})
    assert unserved.status_code == 404 and unserved.json()["error"]
    bad = client.post("/v2/models/model/infer", content=b"not json")
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]
    assert client.get("/v2/models/model/infer").status_code == 405

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(v2, "_answer", broken)
    with caplog.at_level("ERROR", logger="convserve.service.direct"):
        r = client.post("/v2/models/model/infer", json={"inputs": [tensor]})
    assert r.status_code == 500 and "POST /v2/models/model/infer failed" in caplog.text
    monkeypatch.undo()
    text = client.get("/metrics").text
    for route, status, count in [
        ("/v2/models/{name}/infer", "200", 2),  # the proxied one too
        ("/v2/models/{name}/infer", "404", 1),
        ("/v2/models/{name}/infer", "400", 1),
        ("/v2/models/{name}/infer", "500", 1),
        ("/v2/models/{name}/versions/{version}/infer", "200", 1),
        ("/v2/models/{name}/versions/{version}/infer", "404", 1),
    ]:
        series = f'method="POST",route="{route}",status="{status}"'
        assert f"convserve_http_requests_total{{{series}}} {count:.1f}" in text, series


def test_a_direct_route_takes_only_the_request(onnx_path):
    from fastapi import Query

    app = create_app(Settings(model_uri=str(onnx_path)))

    @app.get("/echo")
    async def echo(text: str = Query("x")) -> dict[str, str]:
        return {"text": text}

    with pytest.raises(ValueError, match="takes only the request"):
        app.serve_directly("GET", "/echo", lambda inner: inner)
    with pytest.raises(ValueError, match="no route POST /nothing"):
        app.serve_directly("POST", "/nothing", lambda inner: inner)


def test_a_client_gone_before_its_upload_arrived_is_not_an_error(onnx_path, caplog):
    import asyncio

    app = create_app(Settings(model_uri=str(onnx_path)))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=x")],
    }
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    with TestClient(app), caplog.at_level("ERROR"):  # the lifespan has loaded the model
        asyncio.run(app(scope, receive, send))
    assert sent == [] and "failed" not in caplog.text
    text = app.state.metrics.exposition().decode()
    assert 'route="/predict",status="499"} 1.0' in text and 'status="500"' not in text
