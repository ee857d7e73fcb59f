"""Stop and resume exactly: a run stopped between two steps of an epoch keeps ``last.pt`` at
that place, and a resume ends with the weights of a run that never stopped (bit-identical on
the CPU); a finished run's resume trains and writes nothing."""

from __future__ import annotations

import pytest
import torch

from convserve.training.checkpoint import read_checkpoint
from convserve.training.run import Callbacks, train


def _stop_after(steps: int) -> Callbacks:
    """Asks to stop before step ``steps`` (so exactly ``steps`` steps are trained)."""
    seen = {"steps": 0}

    def on_step(step: int, loss: float, accuracy: float) -> None:
        seen["steps"] = step

    return Callbacks(
        on_step=on_step, should_stop=lambda: seen["steps"] >= steps, stop_status=lambda: "stopped"
    )


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    """Augmentation and dropout draw random numbers at every step, Adam keeps moments and a
    step schedule changes the lr per epoch: all of it is in the checkpoint. The stop comes 4
    batches into epoch 2."""
    sections = dict(
        data={"name": "digits", "batch_size": 32, "limit": 400, "augment": {"pad_crop": 2}},
        model={
            "blocks": [{"out_channels": 8}],
            "hidden": [16],
            "activation": "relu",
            "dropout": 0.2,
        },
    )
    overrides = (
        "optim.epochs=3",
        "optim.schedule=step",
        "optim.step_size=1",
        "diagnostics.every=5",
    )
    whole = train(tiny(*overrides, "tracking.output_dir=" + str(tmp_path / "whole"), **sections))
    assert whole.status == "finished"

    total = read_checkpoint(whole.last_checkpoint)["step"]
    per_epoch = total // 3
    cfg = tiny(*overrides, "tracking.output_dir=" + str(tmp_path / "parts"), **sections)
    stopped = train(cfg, callbacks=_stop_after(per_epoch + 4))
    assert stopped.status == "stopped" and f"step {per_epoch + 4}" in stopped.message
    saved = read_checkpoint(stopped.last_checkpoint)
    assert saved["step"] == per_epoch + 4 and saved["epoch"] == 1
    assert saved["position"]["epoch"] == 2 and saved["position"]["batches"] == 4
    assert "test_accuracy" not in stopped.metrics  # measured once, when the run finishes

    resumed = train(cfg, resume=stopped.last_checkpoint)
    assert resumed.status == "finished"
    final = read_checkpoint(resumed.last_checkpoint)
    assert final["step"] == total
    assert _equal(final["model"], read_checkpoint(whole.last_checkpoint)["model"])
    # the epochs' figures and the snapshots are those of the run that never stopped
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    assert [s.step for s in resumed.snapshots] == [s.step for s in whole.snapshots]
    assert resumed.diagnosis.verdict == whole.diagnosis.verdict
    assert resumed.metrics["test_accuracy"] == whole.metrics["test_accuracy"]


def test_a_stop_at_an_epochs_end_and_twice_in_a_row_still_resume_exactly(tiny, tmp_path):
    whole = train(
        tiny("optim.epochs=2", "data.limit=200", "tracking.output_dir=" + str(tmp_path / "w"))
    )
    cfg = tiny("optim.epochs=2", "data.limit=200", "tracking.output_dir=" + str(tmp_path / "p"))
    per_epoch = read_checkpoint(whole.last_checkpoint)["step"] // 2
    first = train(cfg, callbacks=_stop_after(per_epoch))  # at the epoch's end: validated first
    position = read_checkpoint(first.last_checkpoint)["position"]
    assert (position["epoch"], position["batches"]) == (2, 0)
    assert [h["epoch"] for h in first.history] == [1]
    second = train(cfg, resume=first.last_checkpoint, callbacks=_stop_after(per_epoch + 2))
    assert read_checkpoint(second.last_checkpoint)["position"]["batches"] == 2
    done = train(cfg, resume=second.last_checkpoint)
    assert _equal(
        read_checkpoint(done.last_checkpoint)["model"],
        read_checkpoint(whole.last_checkpoint)["model"],
    )


def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny, tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient

    cfg = tiny("tracking.enabled=true", f"tracking.tracking_uri={sqlite_uri}")
    done = train(cfg)
    before = done.last_checkpoint.read_bytes()
    client = MlflowClient(sqlite_uri)
    history = client.get_metric_history(done.run_id, "test_accuracy")
    again = train(cfg, resume=done.last_checkpoint)
    assert again.status == "finished" and "nothing to resume" in again.message
    assert again.diagnosis.verdict == done.diagnosis.verdict != "unmeasured"
    assert done.last_checkpoint.read_bytes() == before
    assert client.get_metric_history(done.run_id, "test_accuracy") == history
    assert client.get_run(done.run_id).data.tags["convserve.diagnosis"] == done.diagnosis.verdict
    # asking for more epochs than it trained is not a finished run: it goes on
    longer = train(
        cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 2})}),
        resume=done.last_checkpoint,
    )
    assert longer.status == "finished" and [h["epoch"] for h in longer.history] == [1, 2]


class _Killed(BaseException):
    """What the process dying at that point leaves behind: nothing runs after it."""


def test_a_run_lost_while_it_finishes_resumes_and_logs_what_was_missing(
    tiny, tmp_path, sqlite_uri, monkeypatch
):
    """A worker dies after the last step, while the run's test metrics, diagnosis and best.pt
    are being logged. The ``last.pt`` in its artifacts is then the last epoch's, not a finished
    run's: the next attempt trains nothing more (the step budget is spent) and logs all that
    was missing."""
    from mlflow.tracking import MlflowClient

    from convserve.pipelines.runs import last_checkpoint
    from convserve.training.tracking import Tracker

    cfg = tiny(
        "tracking.enabled=true",
        f"tracking.tracking_uri={sqlite_uri}",
        "optim.epochs=3",
        "optim.max_steps=12",  # spent inside epoch 1
    )
    log_dict = Tracker.log_dict

    def dies_at_the_diagnosis(self, data, name):  # type: ignore[no-untyped-def]
        if name == "diagnosis.json":
            raise _Killed
        return log_dict(self, data, name)

    monkeypatch.setattr(Tracker, "log_dict", dies_at_the_diagnosis)
    with pytest.raises(_Killed):
        train(cfg)
    monkeypatch.setattr(Tracker, "log_dict", log_dict)
    client = MlflowClient(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convserve").experiment_id])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/last.pt"]  # best.pt comes last, with the run's end
    saved = last_checkpoint(client, run.info.run_id, str(tmp_path / "downloads"))
    assert saved is not None and not read_checkpoint(saved)["finished"]

    again = train(cfg, resume=saved, run_id=run.info.run_id)
    assert again.status == "finished" and "nothing to resume" not in again.message
    assert [h["epoch"] for h in again.history] == [1]  # no epoch trained after the budget
    assert read_checkpoint(again.last_checkpoint)["step"] == 12
    # measured again on the same weights: the same figure at the same step
    points = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert {(p.step, p.value) for p in points} == {(12, again.metrics["test_accuracy"])}
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["convserve.status"] == "finished"
    assert "convserve.message" not in after.data.tags  # the first attempt's error is gone
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt"}
    final = last_checkpoint(client, run.info.run_id, str(tmp_path / "again"))
    assert final is not None and read_checkpoint(final)["finished"]
