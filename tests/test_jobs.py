"""The job queue's contract: the request schema, the task names, and enqueuing through a
stub task that the API registers and no API process runs; the worker's registered function
takes the message."""

import pytest
from pydantic import ValidationError

from convserve.jobs import (
    RUN_JOB_TASK,
    RUN_TRIAL_TASK,
    JobQueue,
    JobRequest,
    JobSettings,
)
from tests.conftest import TINY
from tests.fresh import imported


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


def _settings(tmp_path):
    return JobSettings(queue_path=str(tmp_path / "q.db"), queue_name="t")


def test_the_api_enqueues_through_stub_tasks_that_only_a_worker_runs(tmp_path):
    api = JobQueue(_settings(tmp_path))
    assert set(api.huey._registry._registry) == {RUN_JOB_TASK, RUN_TRIAL_TASK}
    api.enqueue("run-1")
    api.enqueue("run-1", RUN_TRIAL_TASK)
    assert api.pending_count() == 2
    assert api.waiting(RUN_TRIAL_TASK, "run-1") and api.waiting(RUN_JOB_TASK, "run-1")
    assert not api.waiting(RUN_TRIAL_TASK, "run-2")
    with pytest.raises(RuntimeError, match="only enqueues"):  # the stub, run by mistake
        api._tasks[RUN_JOB_TASK].call_local("run-1")

    ran: list[tuple[str, str]] = []
    worker = JobQueue(
        _settings(tmp_path),
        run_job=lambda run_id: ran.append(("job", run_id)),
        run_trial=lambda run_id: ran.append(("trial", run_id)),
    )
    for task in (RUN_JOB_TASK, RUN_TRIAL_TASK):
        message = worker.huey.dequeue()
        assert f"{type(message).__module__}.{type(message).__name__}" == task
        assert message.args == ("run-1",) and message.retries == 0
        worker.huey.execute(message)
    assert ran == [("job", "run-1"), ("trial", "run-1")] and worker.pending_count() == 0


def test_a_message_carries_a_run_id(tmp_path):
    with pytest.raises(ValidationError):
        JobQueue(_settings(tmp_path)).enqueue("")


def test_the_worker_registers_its_functions_under_the_contract_names(tmp_path):
    from convserve.pipelines.tasks import job_queue

    queue = job_queue(_settings(tmp_path))
    assert set(queue.huey._registry._registry) == {RUN_JOB_TASK, RUN_TRIAL_TASK}
    assert RUN_JOB_TASK == "convserve.run_job" and RUN_TRIAL_TASK == "convserve.run_trial"


def test_the_job_contract_imports_no_torch():
    assert imported("import convserve.jobs", ["torch"]) == []
