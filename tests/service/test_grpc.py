"""KServe v2 over gRPC, spoken by Triton's own client (``tritonclient.grpc``, with its own
generated protocol code) to a real ``convserve serve`` of two worker processes: the same
answers and errors as the HTTP v2 route, its limits, its metrics."""

import re
import socket
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from tests.servers import free_port, process, uvicorn_server
from tests.waiting import limit

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("grpc")]  # one server for the module

MAX_UPLOAD = 100_000


@pytest.fixture(scope="module")
def servers(onnx_path, tmp_path_factory):
    """(HTTP base URL, gRPC address, log file) of one server with two worker processes."""
    grpc_port = free_port()
    folder = tmp_path_factory.mktemp("grpc")
    env = {
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_WORKERS": "2",
        "CONVSERVE_GRPC_PORT": str(grpc_port),
        "CONVSERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    }
    with uvicorn_server(env, folder) as url:
        yield url, f"127.0.0.1:{grpc_port}", folder


@pytest.fixture(scope="module")
def client(servers):
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(servers[1])
    yield client
    client.close()


def _http_infer(url: str, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        "outputs": [{"name": n} for n in outputs],
    }
    answer = httpx.post(f"{url}/v2/models/model/infer", json=body, timeout=limit(30))
    assert answer.status_code == 200, answer.text
    return {
        o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"])
        for o in answer.json()["outputs"]
    }


def test_health_and_metadata_match_http(servers, client):
    url = servers[0]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("model") and client.is_model_ready("model", "")
    meta = client.get_model_metadata("model", as_json=True)
    http_meta = httpx.get(f"{url}/v2/models/model").json()
    for tensors in ("inputs", "outputs"):  # protobuf's JSON writes int64 as strings
        for t in meta[tensors]:
            t["shape"] = [int(d) for d in t["shape"]]
    assert meta["inputs"] == http_meta["inputs"]
    assert meta["outputs"] == http_meta["outputs"]
    assert meta["platform"] == "onnxruntime_onnx" and meta["name"] == "model"
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "convserve"
    assert server["version"] == httpx.get(f"{url}/v2").json()["version"]


def test_infer_answers_as_http_does(servers, client):
    import tritonclient.grpc as tg

    x = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    inp = tg.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    names = ["probabilities", "features.block1"]
    result = client.infer(
        "model", [inp], outputs=[tg.InferRequestedOutput(n) for n in names], request_id="g1"
    )
    response = result.get_response()
    assert response.id == "g1" and response.model_name == "model"
    assert [o.name for o in response.outputs] == names
    http = _http_infer(servers[0], x, names)
    for name in names:
        got = result.as_numpy(name)
        assert got.shape == http[name].shape
        np.testing.assert_allclose(got, http[name], rtol=0, atol=1e-6)
    assert np.allclose(result.as_numpy("probabilities").sum(1), 1, atol=1e-5)
    # no outputs named: every output, in the model's order
    every = client.infer("model", [inp]).get_response()
    assert [o.name for o in every.outputs] == [
        "probabilities",
        "features.block1",
        "features.block2",
    ]


def test_typed_contents_and_fp64(servers):
    """Not every client sends raw bytes: the typed fields of the tensor (FP32 and FP64) give the
    same answer."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = np.random.default_rng(2).random((2, 1, 8, 8))
    with grpc.insecure_channel(servers[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = []
        for datatype, field in (("FP32", "fp32_contents"), ("FP64", "fp64_contents")):
            request = service_pb2.ModelInferRequest(model_name="model")
            tensor = request.inputs.add(name="image", datatype=datatype, shape=x.shape)
            getattr(tensor.contents, field).extend(x.ravel().tolist())
            request.outputs.add(name="probabilities")
            response = stub.ModelInfer(request, timeout=limit(30))
            raw = response.raw_output_contents[0]
            answers.append(np.frombuffer(raw, np.float32).reshape(list(response.outputs[0].shape)))
    http = _http_infer(servers[0], x.astype(np.float32), ["probabilities"])["probabilities"]
    for answer in answers:
        np.testing.assert_allclose(answer, http, rtol=0, atol=1e-6)


def _grpc_error(call) -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), info.value.message()


def test_errors_are_http_errors_with_grpc_codes(servers, client):
    import tritonclient.grpc as tg

    url = servers[0]
    status, message = _grpc_error(lambda: client.get_model_metadata("other"))
    assert status == "StatusCode.NOT_FOUND"
    assert message == httpx.get(f"{url}/v2/models/other").json()["error"]
    status, message = _grpc_error(lambda: client.is_model_ready("model", "99"))
    assert status == "StatusCode.NOT_FOUND" and "version '99'" in message

    wrong = np.zeros((1, 1, 9, 9), np.float32)
    inp = tg.InferInput("image", list(wrong.shape), "FP32")
    inp.set_data_from_numpy(wrong)
    status, message = _grpc_error(lambda: client.infer("model", [inp]))
    body = {
        "inputs": [{"name": "image", "shape": [1, 1, 9, 9], "datatype": "FP32", "data": [0] * 81}]
    }
    http = httpx.post(f"{url}/v2/models/model/infer", json=body)
    assert status == "StatusCode.INVALID_ARGUMENT" and http.status_code == 400
    assert message == http.json()["error"]

    good = tg.InferInput("image", [1, 1, 8, 8], "FP32")
    good.set_data_from_numpy(np.full((1, 1, 8, 8), np.nan, np.float32))
    status, message = _grpc_error(lambda: client.infer("model", [good]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "NaN" in message
    good.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    status, message = _grpc_error(
        lambda: client.infer("model", [good], outputs=[tg.InferRequestedOutput("nope")])
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown output(s) nope" in message


def test_message_limit_is_the_upload_limit(servers, client):
    import tritonclient.grpc as tg

    n = MAX_UPLOAD // (8 * 8 * 4) + 1  # one image more than the limit holds
    inp = tg.InferInput("image", [n, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((n, 1, 8, 8), np.float32))
    status, _ = _grpc_error(lambda: client.infer("model", [inp]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED"
    small = n // 2
    inp = tg.InferInput("image", [small, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((small, 1, 8, 8), np.float32))
    assert client.infer("model", [inp]).as_numpy("probabilities").shape == (small, 10)


def test_calls_are_counted_in_the_metrics(servers, client):
    import tritonclient.grpc as tg

    def counted(status: str) -> float:
        text = httpx.get(f"{servers[0]}/metrics").text
        pattern = (
            r'convserve_http_requests_total\{method="GRPC",'
            r'route="/inference.GRPCInferenceService/ModelInfer",status="' + status + r'"\} (\S+)'
        )
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0

    ok, invalid = counted("OK"), counted("INVALID_ARGUMENT")
    inp = tg.InferInput("image", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    for _ in range(3):
        client.infer("model", [inp])
    bad = tg.InferInput("image", [1, 2, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2, 8, 8), np.float32))
    _grpc_error(lambda: client.infer("model", [bad]))
    assert counted("OK") == ok + 3  # summed over both worker processes
    assert counted("INVALID_ARGUMENT") == invalid + 1


def test_every_worker_serves_grpc(servers):
    log = next(Path(servers[2]).glob("serve-*.log")).read_text()
    assert log.count(f"KServe v2 gRPC on {servers[1]}") == 2, log


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "so_reuseport"])
def test_a_taken_port_stops_the_server_with_the_reason(onnx_path, tmp_path, reuseport):
    """A port another program holds is a start-up error, not a server that runs without gRPC;
    held with SO_REUSEPORT as well (as another serve's workers hold theirs), where binding
    with SO_REUSEPORT alone would share it out between the two."""
    import os

    with socket.socket() as taken:
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "CONVSERVE_MODEL_URI": str(onnx_path),
            "CONVSERVE_WORKERS": "1",
            "CONVSERVE_PORT": str(free_port()),
            "CONVSERVE_GRPC_PORT": str(port),
        }
        cli = str(Path(sys.executable).parent / "convserve")
        log = tmp_path / "serve.log"
        with process([cli, "serve"], log, env, tmp_path) as proc:
            assert proc.wait(timeout=limit(60)) != 0
        message = " ".join(log.read_text().split())  # the console wraps at its width
        assert f"cannot serve gRPC on 127.0.0.1:{port} (CONVSERVE_GRPC_PORT" in message
        assert "Address already in use" in message
