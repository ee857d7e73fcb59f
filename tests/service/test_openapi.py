"""The OpenAPI description is complete: every operation described, every parameter
described, every request body and success answer with an example, every error answer a route
can give documented with its body."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from convserve.service.app import create_app
from convserve.service.settings import Settings


@pytest.fixture(scope="module")
def spec(onnx_path):
    app = create_app(Settings(model_uri=str(onnx_path)))
    return TestClient(app).get("/openapi.json").json()


def _operations(spec):
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            yield f"{method.upper()} {path}", op


def _has_example(spec, content: dict) -> bool:
    for media in content.values():
        if "example" in media or "examples" in media:
            return True
        schema = media.get("schema", {})
        ref = schema.get("$ref")
        if ref:
            schema = spec["components"]["schemas"][ref.split("/")[-1]]
        if "example" in schema or "examples" in schema:
            return True
    return False


def test_every_operation_and_parameter_is_described(spec):
    missing = []
    for name, op in _operations(spec):
        if not op.get("description"):
            missing.append(f"{name}: no description")
        for p in op.get("parameters", []):
            if not p.get("description"):
                missing.append(f"{name}: parameter {p['name']} has no description")
    assert missing == []


def test_every_body_and_answer_has_an_example(spec):
    missing = []
    for name, op in _operations(spec):
        body = op.get("requestBody")
        if body and not _has_example(spec, body["content"]):
            missing.append(f"{name}: request body without an example")
        for code, answer in op["responses"].items():
            documented = "content" not in answer or _has_example(spec, answer["content"])
            if code.startswith("2") and not documented:
                missing.append(f"{name}: {code} answer without an example")
    assert missing == []


ERRORS = {
    "POST /predict": {"413", "422", "503"},
    "POST /jobs": {"401", "422", "429", "503"},
    "GET /jobs/{job_id}": {"404"},
    "GET /jobs/{job_id}/diagnostics": {"404"},
    "POST /datasets": {"401", "413", "422", "503"},
    "GET /datasets/{dataset}": {"404"},
    "DELETE /datasets/{dataset}": {"401", "404"},
    "DELETE /jobs/{job_id}": {"401", "404"},
    "GET /jobs": {"422"},
    "POST /admin/reload": {"401"},
    "GET /v1/model": {"503"},
    "GET /readyz": {"503"},
    "POST /v2/models/{name}/infer": {"400", "404", "503"},
    "POST /v2/models/{name}/versions/{version}/infer": {"400", "404", "503"},
}


@pytest.mark.parametrize(("name", "codes"), ERRORS.items())
def test_error_answers_are_documented_with_their_body(spec, name, codes):
    ops = dict(_operations(spec))
    responses = ops[name]["responses"]
    assert codes <= set(responses), f"{name} documents {sorted(responses)}"
    for code in codes:
        assert "content" in responses[code] and responses[code].get("description")
