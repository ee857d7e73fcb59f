"""The lease fails closed: only the listed reads pass once it is lost; every other call of
the MLflow client, ``log_inputs`` and any method a newer MLflow adds included, is skipped.
The reaper takes every lost job, however many pages the search of running jobs has."""

import time

from mlflow.entities import Dataset, DatasetInput, RunTag
from mlflow.tracking import MlflowClient

from convserve.jobs import JobSettings, Tag
from convserve.pipelines import reaper
from convserve.pipelines.lease import READS, GuardedClient, Lease


def _running_job(client: MlflowClient, experiment: str, worker: str, beat: float) -> str:
    run_id = client.create_run(experiment).info.run_id
    tags = {Tag.KIND: "job", Tag.STATUS: "running", Tag.WORKER: worker, Tag.ATTEMPT: "1"}
    tags[Tag.HEARTBEAT] = f"{beat:.3f}"
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return run_id


def test_reads_are_read_only_methods_of_the_client():
    for name in READS - {"tracking_uri"}:
        assert callable(getattr(MlflowClient, name)), name
        assert name.split("_")[0] in ("get", "search", "list", "download"), name
    assert "log_inputs" not in READS and "create_run" not in READS


def test_a_lost_lease_lets_reads_through_and_nothing_else(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("lease")
    run_id = _running_job(client, experiment, "w1", time.time())
    lease = Lease(client, run_id, "w1", attempt=1, interval=0.0)
    guarded = GuardedClient(client, lease)
    guarded.set_tag(run_id, "held", "yes")
    assert client.get_run(run_id).data.tags["held"] == "yes"

    client.set_tag(run_id, Tag.ATTEMPT, "2")  # the reaper scheduled attempt 2: lease over
    assert guarded.get_run(run_id).info.run_id == run_id  # a read passes
    assert guarded.set_tag(run_id, "after", "x") is None
    data = Dataset(name="d", digest="abc", source_type="local", source="x")
    assert guarded.log_inputs(run_id, datasets=[DatasetInput(data, tags=[])]) is None
    assert client.get_run(run_id).inputs.dataset_inputs == []  # not in any list of writes
    assert guarded.create_run(experiment) is None
    assert "after" not in client.get_run(run_id).data.tags
    assert len(client.search_runs([experiment])) == 1  # no run was created
    assert not lease.held()


def test_the_reaper_pages_through_every_running_job(sqlite_uri, monkeypatch):
    monkeypatch.setattr(reaper, "PAGE", 2)
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("reap")
    lost = [_running_job(client, experiment, f"w{i}", time.time() - 600) for i in range(5)]
    alive = _running_job(client, experiment, "w9", time.time())
    for run_id in [*lost, alive]:
        client.update_run(run_id, status="RUNNING")
    settings = JobSettings(worker_lost_after=60, job_retries=0)
    assert sorted(reaper.reap(client, settings)) == sorted(lost)
    for run_id in lost:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "worker lost" in run.data.tags[Tag.ERROR]
    assert client.get_run(alive).info.status == "RUNNING"
    assert reaper.reap(client, settings) == []


def test_an_answer_that_arrives_after_a_stall_is_not_taken_as_fresh(sqlite_uri):
    """A worker stopped (SIGSTOP) while its lease check was on its way wakes up to an answer
    from before the stop: it may let one write through, and the next call asks again."""
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("stall")
    run_id = _running_job(client, experiment, "w1", time.time())
    client.update_run(run_id, status="RUNNING")

    class Stalled:
        stalled = False

        def get_run(self, run_id: str):  # type: ignore[no-untyped-def]
            if self.stalled:
                return client.get_run(run_id)
            self.stalled = True
            answer = client.get_run(run_id)  # the server answered: still this worker's
            client.set_tag(run_id, Tag.ATTEMPT, "2")  # meanwhile the reaper took the job
            time.sleep(0.3)  # and this process stood still before reading the answer
            return answer

    lease = Lease(Stalled(), run_id, "w1", attempt=1, interval=0.2)
    assert lease.held()  # the stale answer, once
    assert not lease.held()  # as old as its question: asked again, and lost
