"""Data-parallel training with real processes: ``convserve train --nproc-per-node 2`` runs
torchrun with two gloo ranks on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import TINY
from tests.waiting import limit

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
CLI = str(Path(sys.executable).parent / "convserve")


def _config(tmp_path: Path, name: str, limit: int | None = None, **optim) -> Path:
    data = {
        **TINY,
        "optim": {**TINY["optim"], **optim},
        "diagnostics": {"every": 5, "plots": False},
    }
    if limit is not None:  # fewer images: shorter epochs
        data["data"] = {**TINY["data"], "limit": limit}
    data["tracking"] = {"enabled": False, "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(config: Path, *extra: str, nproc: int = 1, timeout: float = 180):
    argv = [CLI, "train", "--config", str(config), *extra]
    if nproc > 1:
        argv += ["--nproc-per-node", str(nproc)]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=limit(timeout), cwd=config.parent
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    (last,) = folder.glob("*/last.pt")
    return torch.load(last, weights_only=False)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_processes_and_a_resume_hold_the_weights_one_process_holds(tmp_path):
    """A global batch of 32 (16 a rank), diagnostics every 5 steps: one epoch on two
    processes, then a resume to the second, end with the weights one process holds after two
    epochs in one go, within 1e-5 (the epochs' last batches too); rank 0 alone logs to MLflow
    and keeps checkpoints, and the resume continues its run."""
    whole = _config(tmp_path, "whole", limit=400, epochs=2)  # 400 images: short epochs
    out = _train(whole)
    assert out.returncode == 0, out.stdout + out.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = ["--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri={uri}"]
    first = _config(tmp_path, "first", limit=400, epochs=1)
    out = _train(first, *tracked, "--set", "tracking.experiment=ddp", nproc=2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training on 2 processes" in out.stdout
    assert out.stdout.count("status: finished") == 1  # rank 0 alone reports
    (last,) = (tmp_path / "first").glob("*/last.pt")  # rank 0's checkpoints only
    out = _train(first, "--resume", str(last), "--set", "optim.epochs=2", nproc=2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "epoch 2:" in out.stdout and "epoch 1:" not in out.stdout
    resumed = torch.load(last, weights_only=False)  # the run's folder: the same last.pt
    assert resumed["epoch"] == 2
    assert _max_diff(_weights(tmp_path / "whole"), resumed["model"]) <= 1e-5
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["val_accuracy"] > 0.3
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
    # snapshots averaged over the ranks, at steps 0, 5, ... (logged as steps 1, 6, ...)
    grad = client.get_metric_history(run.info.run_id, "diag.block1.conv.grad_std")
    assert sorted(m.step for m in grad)[:2] == [1, 6] and all(m.value > 0 for m in grad)


def test_a_diverging_data_parallel_run_ends_on_every_rank(tmp_path):
    config = _config(tmp_path, "diverge", optimizer="sgd", lr=10.0, max_steps=50)
    out = _train(config, "--set", "init.scale=20", nproc=2, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "status: diverged" in out.stdout


def test_what_a_data_parallel_run_cannot_do_is_refused_before_it_starts():
    from convserve.training.distributed import check

    check(32, 2, balance="weights", compile=False)
    with pytest.raises(ValueError, match="must split evenly over 3 processes"):
        check(32, 3, balance="none", compile=False)
    with pytest.raises(ValueError, match="data.balance=weights"):
        check(32, 2, balance="sampler", compile=False)
    with pytest.raises(ValueError, match="optim.compile"):
        check(32, 2, balance="none", compile=True)
