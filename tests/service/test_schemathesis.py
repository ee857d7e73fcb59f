"""schemathesis against the live OpenAPI of a real ``convserve serve`` process: every operation
with generated and hostile inputs, all its checks, and its stateful phase (links between
operations, such as a job created, read and cancelled). 0 server errors, answers that match
their documented schemas, status codes and headers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import uvicorn_server
from tests.waiting import limit

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Two checks assume what this API does not: that every schema-valid value is accepted (an
# upload that is not an image, a tensor of the wrong shape or a page token the server never
# handed out are valid strings and arrays, and rightly refused with a 4xx naming them), and
# that DELETE removes (DELETE /jobs/{id} cancels a job, which stays readable).
EXCLUDED = "positive_data_acceptance,use_after_free"


def test_the_live_api_holds_up_to_schemathesis(onnx_path, tmp_path):
    env = {
        "CONVSERVE_MODEL_URI": str(onnx_path),
        "CONVSERVE_API_TOKEN": "st-token",
        "CONVSERVE_QUEUE_PATH": str(tmp_path / "queue.db"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CONVSERVE_MAX_UPLOAD_BYTES": "200000",
    }
    st = str(Path(sys.executable).parent / "st")
    with uvicorn_server(env, tmp_path) as url:
        out = subprocess.run(
            [
                st,
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                EXCLUDED,
                "--max-examples",
                "15",
                "--seed",
                "1",
                "--request-timeout",
                "30",
                "-H",
                "Authorization: Bearer st-token",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=limit(600),
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
            cwd=tmp_path,  # its .hypothesis/ and .schemathesis/ folders
        )
        serve_log = next(tmp_path.glob("serve-*.log")).read_text()
    assert out.returncode == 0, out.stdout[-6000:]
    assert "Traceback" not in serve_log  # nothing went wrong behind the answers either
