"""The queue as the API sees it: the request schema, and enqueuing by task name without the
worker's code; a worker-registered task takes the message."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from convserve.contract import RUN_JOB_TASK, JobPayload
from convserve.pipelines.queue import JobRequest, JobSettings, enqueue, make_queue
from tests.conftest import TINY


def test_a_request_is_a_train_or_a_sweep():
    assert JobRequest.model_validate({"train": TINY}).kind == "train"
    sweep = {"base": TINY, "grid": {"seed": [0, 1]}}
    request = JobRequest.model_validate({"sweep": sweep, "register": False})
    assert request.kind == "sweep" and request.register_model is False
    assert request.config.seed == 0
    with pytest.raises(ValidationError, match="exactly one of"):
        JobRequest.model_validate({})
    with pytest.raises(ValidationError, match="exactly one of"):
        JobRequest.model_validate({"train": TINY, "sweep": sweep})


def test_the_api_side_registers_no_task_and_enqueues_by_name(tmp_path):
    huey = make_queue(JobSettings(queue_path=str(tmp_path / "q.db"), queue_name="t"))
    assert huey._registry._registry == {}  # the API process knows no task function
    enqueue(huey, JobPayload(run_id="run-1"))
    assert huey.pending_count() == 1

    from convserve.pipelines.worker import register_task

    consumer_side = make_queue(JobSettings(queue_path=str(tmp_path / "q.db"), queue_name="t"))
    register_task(consumer_side, JobSettings())
    task = consumer_side.dequeue()
    assert f"{type(task).__module__}.{type(task).__name__}" == RUN_JOB_TASK
    assert task.args == ("run-1",) and task.retries == 0


def test_queue_module_imports_no_torch():
    code = "import sys, convserve.pipelines.queue; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
