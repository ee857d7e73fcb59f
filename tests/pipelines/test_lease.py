"""The lease fails closed: only the listed reads pass once it is lost; every other call of
the MLflow client, ``log_inputs`` and any method a newer MLflow adds included, is skipped.
The reaper takes every lost job, however many pages the search of running jobs has, and a
lost job once, however many reapers see it."""

import time

from mlflow.entities import Dataset, DatasetInput, RunTag
from mlflow.tracking import MlflowClient

from convserve.jobs import JobQueue, JobSettings, Tag
from convserve.pipelines import reaper
from convserve.pipelines.heartbeat import Heartbeat
from convserve.pipelines.lease import READS, GuardedClient, Lease
from tests.waiting import wait_until


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


def test_two_reapers_take_a_lost_job_once_and_never_fail_its_next_attempt(
    sqlite_uri, tmp_path, monkeypatch
):
    """Every worker runs a reaper. One that read the running jobs before another took the
    lost job leaves it alone; and while it is taken, no reader sees it running on its next
    attempt with the lost attempt's stale heartbeat (which a third reaper would fail)."""
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("two-reapers")
    run_id = _running_job(client, experiment, "w1", time.time() - 600)
    client.update_run(run_id, status="RUNNING")
    settings = JobSettings(
        worker_lost_after=60, job_retries=1, queue_path=str(tmp_path / "queue.db")
    )
    queue = JobQueue(settings)
    older_listing = list(reaper.running_jobs(client))  # the second reaper's search

    seen = []  # the run as a reader finds it after each write of the first reaper

    class Watched:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            call = getattr(client, name)
            if name not in ("update_run", "log_batch", "set_tag", "set_terminated"):
                return call

            def write(*args, **kwargs):  # type: ignore[no-untyped-def]
                call(*args, **kwargs)
                run = client.get_run(run_id)
                seen.append((run.info.status, run.data.tags.get(Tag.ATTEMPT)))

            return write

    assert reaper.reap(Watched(), settings, queue) == [run_id]
    assert seen and ("RUNNING", "2") not in seen, seen

    monkeypatch.setattr(reaper, "running_jobs", lambda *_: iter(older_listing))
    assert reaper.reap(client, settings, queue) == []
    run = client.get_run(run_id)
    assert run.info.status == "SCHEDULED"
    assert run.data.tags[Tag.ATTEMPT] == "2" and run.data.tags[Tag.STATUS] == "scheduled"
    assert queue.pending_count() == 1  # one message: the job runs once

    # the next attempt is taken, then its worker is lost too: no retry is left, and the job
    # fails, once
    monkeypatch.undo()
    client.log_batch(
        run_id,
        tags=[RunTag(Tag.HEARTBEAT, f"{time.time() - 600:.3f}"), RunTag(Tag.WORKER, "w2")],
    )
    client.update_run(run_id, status="RUNNING")
    assert reaper.reap(client, settings, queue) == [run_id]
    assert client.get_run(run_id).info.status == "FAILED"


def test_a_late_beat_is_logged_and_a_skipped_one_is_not(sqlite_uri, caplog):
    """A job's first beat comes at once; one that comes more than half of
    ``worker_lost_after`` after the last says so (a busy machine, a slow tracking server),
    and a beat the lost lease skipped is not taken for one written."""
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("beats")
    settings = JobSettings(worker_lost_after=60, heartbeat_interval=30)

    def late() -> list[str]:
        return [r.getMessage() for r in caplog.records if "late" in r.getMessage()]

    for worker in ("w1", "w2"):  # w2's lease is lost: the run says w1
        run_id = _running_job(client, experiment, "w1", time.time() - 100)
        client.update_run(run_id, status="RUNNING")
        lease = Lease(client, run_id, worker, attempt=1, interval=0.0)
        with caplog.at_level("WARNING", logger="convserve.pipelines.heartbeat"):
            with Heartbeat(GuardedClient(client, lease), lease, settings, time.time() - 40):
                beaten = lambda held=lease.held: not held() or late()  # noqa: E731
                wait_until(beaten, 30, "the first beat", 0.05)
        beat = float(client.get_run(run_id).data.tags[Tag.HEARTBEAT])
        if worker == "w1":
            assert time.time() - beat < 20  # written at once, not after heartbeat_interval
            [message] = late()
            assert "late: 40." in message and "after 60 s" in message
        else:
            assert time.time() - beat > 90  # not written
            assert late() == []
        caplog.clear()
