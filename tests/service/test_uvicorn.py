"""A real ``convserve serve`` process: malformed uploads and the KServe v2 protocol spoken by
an off-the-shelf client (Triton's ``tritonclient.http``)."""

import io
import json
import os
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from convserve.service.server import PAGED_OUT
from tests.servers import (
    follow_env,
    free_port,
    process,
    registered_model,
    uvicorn_server,
    wait_http,
)
from tests.service.test_imaging import png_bomb
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    env = {
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_MAX_UPLOAD_BYTES": "100000",
        "CONVSERVE_MAX_PIXELS": "1000000",
        "CONVSERVE_API_TOKEN": "tok",
    }
    with uvicorn_server(env, tmp_path_factory.mktemp("serve")) as url:
        yield url


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 77).save(buf, "PNG")
    return buf.getvalue()


CORPUS = [
    ("empty", {"files": {"file": ("e.png", b"", "image/png")}}, 422, "empty"),
    (
        "garbage",
        {"files": {"file": ("g.png", b"\x00\x01garbage" * 50, "image/png")}},
        422,
        "not an image",
    ),
    ("text", {"files": {"file": ("t.txt", b"hello world", "text/plain")}}, 422, "not an image"),
    (
        "truncated",
        {"files": {"file": ("t.png", _png((64, 64))[:60], "image/png")}},
        422,
        "truncated or corrupt",
    ),
    (
        "bomb",
        {"files": {"file": ("b.png", png_bomb(30000, 30000), "image/png")}},
        413,
        "CONVSERVE_MAX_PIXELS",
    ),
    (
        "too big",
        {"files": {"file": ("big.png", b"\x89PNG" + b"1" * 200_000, "image/png")}},
        413,
        "CONVSERVE_MAX_UPLOAD_BYTES",
    ),
    ("no file", {"data": {"other": "x"}}, 422, "`file`"),
    ("json body", {"json": {"image": [1, 2, 3]}}, 422, None),
    (
        "bad top_k",
        {"files": {"file": ("x.png", _png(), "image/png")}, "params": {"top_k": 0}},
        422,
        None,
    ),
    (
        "bad format",
        {
            "files": {"file": ("x.png", _png(), "image/png")},
            "params": {"feature_maps": "all", "format": "jpeg"},
        },
        422,
        None,
    ),
    (
        "pdf",
        {"files": {"file": ("d.pdf", b"%PDF-1.4\n%fake", "application/pdf")}},
        422,
        "not an image",
    ),
]


def test_malformed_uploads_get_the_right_4xx_and_the_service_keeps_serving(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        for name, kwargs, status, text in CORPUS:
            r = client.post("/predict", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            if text is not None:
                assert text in str(detail), (name, detail)
        r = client.post("/v2/models/model/infer", content=b"{not json")
        assert r.status_code == 400 and "error" in r.json()
        assert client.get("/readyz").status_code == 200
        ok = client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
        assert ok.status_code == 200
        metrics = client.get("/metrics").text
        assert 'status="500"' not in metrics


def test_kserve_v2_with_an_off_the_shelf_client(server):
    import tritonclient.http as tc

    client = tc.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("model")
    meta = client.get_model_metadata("model")
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    assert [o["name"] for o in meta["outputs"]] == [
        "probabilities",
        "features.block1",
        "features.block2",
    ]
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    for binary in (False, True):
        inp = tc.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [
            tc.InferRequestedOutput("probabilities", binary_data=binary),
            tc.InferRequestedOutput("features.block2", binary_data=binary),
        ]
        result = client.infer("model", [inp], outputs=outs, request_id="r1")
        probs = result.as_numpy("probabilities")
        assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert result.as_numpy("features.block2").shape == (3, 8, 4, 4)
        assert result.get_response()["id"] == "r1"
    # the same numbers as /predict for the same pixels
    img = Image.fromarray((x[0, 0] * 255).round().astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    rest = httpx.post(
        f"{server}/predict", files={"file": ("x.png", buf.getvalue())}, params={"fit": "none"}
    ).json()
    inp = tc.InferInput("image", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy((np.asarray(img, np.float32) / 255)[None, None])
    v2 = client.infer("model", [inp]).as_numpy("probabilities")[0]
    assert np.allclose(v2, list(rest["predictions"][0]["probabilities"].values()), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (
            {
                "inputs": [
                    {"name": "image", "shape": [1, 1, 8, 7], "datatype": "FP32", "data": [0.0] * 56}
                ]
            },
            400,
            "does not match",
        ),
        (
            {
                "inputs": [
                    {"name": "image", "shape": [1, 1, 8, 8], "datatype": "INT8", "data": [0] * 64}
                ]
            },
            400,
            "datatype",
        ),
        (
            {
                "inputs": [
                    {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 10}
                ]
            },
            400,
            "needs 64",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "data": [0.0] * 64,
                    }
                ]
            },
            400,
            "unknown input",
        ),
        (
            {
                "inputs": [
                    {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
                ],
                "outputs": [{"name": "logits"}],
            },
            400,
            "unknown output",
        ),
        ({"inputs": "nope"}, 400, "invalid inference request"),
    ],
)
def test_v2_errors_are_json_with_error(server, body, status, text):
    r = httpx.post(f"{server}/v2/models/model/infer", content=json.dumps(body))
    assert r.status_code == status and text in r.json()["error"]


def test_v2_unknown_model_and_version(server):
    r = httpx.get(f"{server}/v2/models/other")
    assert r.status_code == 404 and "serves 'model'" in r.json()["error"]
    r = httpx.get(f"{server}/v2/models/model/versions/7/ready")
    assert r.status_code == 404 and "not loaded" in r.json()["error"]
    assert httpx.get(f"{server}/v2/models/model/versions/file").status_code == 200
    assert httpx.get(f"{server}/v2").json()["name"] == "convserve"


def _server_processes(pid: int) -> list[int]:
    """The worker processes under ``pid`` (forked: not multiprocessing's resource tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"resource_tracker" not in cmdline:
            out.append(int(stat.parent.name))
    return out


def test_serve_options_reach_every_worker_process(onnx_path, tmp_path):
    """``convserve serve --workers 2 --model-uri ...``: the options travel as settings objects
    (no CONVSERVE_MODEL_URI in the environment), and both processes serve the model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env["TMPDIR"] = str(tmp_path / "tmp")
    env["CONVSERVE_API_TOKEN"] = "tok"
    (tmp_path / "tmp").mkdir()
    port = free_port()
    cli = str(Path(sys.executable).parent / "convserve")
    argv = [cli, "serve", "--model-uri", str(onnx_path), "--workers", "2", "--port", str(port)]
    with process(argv, tmp_path / "serve.log", env, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc, timeout=60)
        wait_until(lambda: len(_server_processes(proc.pid)) == 2, 30, "two server processes", 0.2)
        log = (tmp_path / "serve.log").read_text()
        assert "2 worker processes, " in log and "onnxruntime thread" in log
        # the command ran the server in its own place, with its settings in a file, not in argv
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1:4] == [b"-m", b"convserve.service", b"--settings-fd"]
        # both serve: the supervisor gives back the library pages only it used
        wait_until(lambda: PAGED_OUT in (tmp_path / "serve.log").read_text(), 30, "the page-out")
        for _ in range(20):  # whichever process answers, it serves the file it was given
            assert httpx.get(f"{url}/v1/model").json()["uri"] == str(onnx_path)
        for _ in range(30):  # new connections: the kernel spreads them over the processes
            r = httpx.post(f"{url}/predict", files={"file": ("x.png", _png())})
            assert r.status_code == 200
        # every scrape, whichever process takes it, counts the requests of both
        for _ in range(6):
            metrics = httpx.get(f"{url}/metrics").text
            assert (
                _sample(
                    metrics,
                    'convserve_http_requests_total{method="POST",route="/predict",status="200"}',
                )
                == 30
            )
            assert _sample(metrics, "convserve_inference_images_total") == 30
        # /admin/reload reaches one worker; it passes the request on to the other
        assert _sample(metrics, "convserve_model_reloads_total") == 2
        auth = {"Authorization": "Bearer tok"}
        r = httpx.post(f"{url}/admin/reload", params={"force": True}, headers=auth)
        assert r.status_code == 200 and r.json()["changed"]
        wait_until(
            lambda: _sample(httpx.get(f"{url}/metrics").text, "convserve_model_reloads_total") == 4,
            5,
            "both processes reloaded",
        )
        (folder,) = (tmp_path / "tmp").glob("convserve-metrics-*")  # made by serve
        for pid in _server_processes(proc.pid):  # both processes counted requests
            assert (folder / f"counter_{pid}.db").exists()
    assert not folder.exists()  # removed at the end
    assert not (tmp_path / "mlflow.db").exists()  # a server that only predicts opens no store


def test_requests_that_arrive_together_share_one_run(onnx_path, tmp_path):
    """The test model runs on the event loop, and a run there holds the loop: the requests
    that came in with one each found the engine idle and ran alone, so no batch formed
    whatever the batch size. Sixteen requests written at once on sixteen connections, five
    times over, now share runs, and each is answered."""
    import http.client

    env = {"CONVSERVE_MODEL_URI": str(onnx_path), "CONVSERVE_MAX_BATCH_SIZE": "16"}
    with uvicorn_server(env, tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        body = part + b"Content-Type: image/png\r\n\r\n" + _png() + b"\r\n--b--\r\n"
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
        before = httpx.get(f"{url}/metrics").text
        for _ in range(5):
            connections = [
                http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(16)
            ]
            for connection in connections:
                connection.connect()
            for connection in connections:  # every request out before any answer is read
                connection.request("POST", "/predict", body, headers)
            for connection in connections:
                answer = connection.getresponse()
                assert answer.status == 200 and json.loads(answer.read())["predictions"]
                connection.close()
        after = httpx.get(f"{url}/metrics").text
    images, runs = (
        _sample(after, name) - _sample(before, name)
        for name in ("convserve_inference_images_total", "convserve_inference_batch_size_count")
    )
    assert images == 80 and runs < images, (images, runs)


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


def _raw_upload(url: str, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request by hand, still writing its body when the server answers; return the
    answer as read (a reset connection would raise instead)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.002)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_an_upload_over_the_limit_is_a_413_the_client_can_read(server, framing):
    start = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    body = [start] + [b"x" * 16384] * 20  # a well-formed start, then 320 KB: over 100 KB
    if framing == "chunked":
        head = (
            b"POST /predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in body] + [b"0\r\n\r\n"]
    else:
        size = sum(map(len, body))
        head = (
            b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" % size
        )
        chunks = body
    answer = _raw_upload(server, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"CONVSERVE_MAX_UPLOAD_BYTES" in answer
    assert httpx.get(f"{server}/readyz").status_code == 200


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_client_that_writes_its_whole_body_before_reading_reads_the_413(server, framing):
    """8 MiB written in one go, as curl or requests do, then the answer read: the server
    drains the body before it ends the answer (a reset connection raised here before)."""
    import socket

    body = b"--b\r\n" + b"x" * (8 * 1024 * 1024)
    kind = b"Content-Type: multipart/form-data; boundary=b\r\n"
    if framing == "chunked":
        head = b"POST /predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n" + kind
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        head = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n" % len(body) + kind
        payload = body
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"\r\n" + payload)
        answer = b""
        while not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            assert data, answer
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"CONVSERVE_MAX_UPLOAD_BYTES" in answer


def test_too_many_parts_is_a_413(server):
    """81 parts: more than CONVSERVE_MAX_FILES images and the other fields allowed (a 400
    "malformed" before)."""
    files = [("files", (f"{i}.png", b"x", "image/png")) for i in range(81)]
    answer = httpx.post(f"{server}/predict", files=files)
    assert answer.status_code == 413, answer.text
    assert "CONVSERVE_MAX_FILES" in answer.json()["detail"]


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def _stall(port: int, clients: int, head: bytes) -> list[bytes]:
    """``clients`` connections that send ``head`` and nothing more; what each reads until
    the server closes it."""
    import socket

    sockets = []
    for _ in range(clients):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(head)
        sockets.append(sock)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    answers = []
    for sock in sockets:
        with sock:
            answer = b""
            while data := sock.recv(65536):  # to the end: the server closes
                answer += data
            answers.append(answer)
    return answers


def test_a_thousand_stalled_uploads_are_answered_408_and_closed(onnx_path, tmp_path):
    """1,000 clients send their headers and the start of a body, then stall, three times:
    each is answered 408 and closed after CONVSERVE_BODY_READ_TIMEOUT, the service answers
    others meanwhile, and the memory they held comes back (the rounds after the first add
    nothing to what the first left)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:  # the server inherits it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    port = free_port()
    env = {
        **os.environ,
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_WORKERS": "1",
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_BODY_READ_TIMEOUT": "2",
    }
    cli = str(Path(sys.executable).parent / "convserve")
    url = f"http://127.0.0.1:{port}"
    head = (
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 50000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
    )
    with process([cli, "serve"], tmp_path / "serve.log", env, tmp_path) as proc:
        wait_http(f"{url}/readyz", proc)
        rss = [_rss_kb(proc.pid)]
        for _ in range(3):
            answers = _stall(port, 1000, head)
            assert {a.split(b"\r\n", 1)[0] for a in answers} == {b"HTTP/1.1 408 Request Timeout"}
            assert b"CONVSERVE_BODY_READ_TIMEOUT" in answers[0]
            assert httpx.post(f"{url}/predict", files={"file": ("x.png", _png())}).is_success
            rss.append(_rss_kb(proc.pid))
    print(f"RSS (kB) at start and after each round of 1,000 stalled uploads: {rss}")
    assert rss[3] - rss[1] < 4_000, rss
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_a_worker_imports_nothing_of_its_own_to_start_and_answer(onnx_path, mlflow_url, tmp_path):
    """Two worker processes following a model in a real MLflow registry over REST, as
    ``convserve up`` runs them: every module a worker needs to start, load the model, answer
    ``/predict``, KServe v2, ``/metrics`` and the docs was imported by their parent before it
    forked them (``server.preload``), where its pages are shared. A module a worker imports
    itself is a private copy in each: with these imports moved before the fork, the idle tree
    of two workers following a registry went from 149.7 to 141.5 MB of PSS. ``PYTHONVERBOSE``
    logs every import; the workers' start is the first "Started server process"."""
    client, name, (version,) = registered_model(mlflow_url, onnx_path, "preload", 1)
    client.set_registered_model_alias(name, "champion", version)
    env = {
        **os.environ,
        **follow_env(mlflow_url, name, tmp_path / "cache"),
        "CONVSERVE_WORKERS": "2",
        "CONVSERVE_MODELS": "",
        "PYTHONVERBOSE": "1",
    }
    port = free_port()
    env.update({"CONVSERVE_PORT": str(port), "CONVSERVE_HOST": "127.0.0.1"})
    cli = str(Path(sys.executable).parent / "convserve")
    log = tmp_path / "serve.log"
    with process([cli, "serve"], log, env, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc, timeout=60)
        wait_until(lambda: len(_server_processes(proc.pid)) == 2, 30, "two server processes", 0.2)
        (tensor,) = httpx.get(f"{url}/v2/models/{name}").json()["inputs"]
        shape = [1, *tensor["shape"][1:]]
        v2 = {"inputs": [{"name": tensor["name"], "shape": shape, "datatype": "FP32",
                          "data": [0.0] * int(np.prod(shape))}]}  # fmt: skip
        for _ in range(10):  # new connections: the kernel spreads them over both processes
            r = httpx.post(f"{url}/predict", files={"file": ("x.png", _png())})
            assert r.status_code == 200
            assert httpx.post(f"{url}/v2/models/{name}/infer", json=v2).status_code == 200
            assert httpx.get(f"{url}/metrics").status_code == 200
            assert httpx.get(f"{url}/docs").status_code == 200
        text = log.read_text()
    assert "Started server process" in text
    # the command ran the server in its place: the server process holds none of its libraries
    assert re.search(r"^import 'typer'", text, re.MULTILINE)  # imported by the command
    server_process = text.rsplit("import 'convserve' ", 1)[1]  # the second interpreter's
    assert "import 'onnxruntime'" in server_process
    # (click comes with uvicorn, and rich with httpx where they are installed)
    cli = re.findall(r"^import '((?:typer|convserve\.cli)\b[\w.]*)'", server_process, re.MULTILINE)
    assert cli == [], f"the server process imported the command line's {cli}"
    before, after = text.split("Started server process", 1)
    assert "import 'httpx'" in before and "import 'uvloop'" in before  # the parent's preload
    imported = sorted(set(re.findall(r"^import '([\w.]+)'", after, re.MULTILINE)))
    assert imported == [], f"imported by a worker after the fork: {imported}"
