"""Data-parallel training with real processes: ``convserve train --nproc-per-node 2`` runs
torchrun with two gloo ranks on the CPU."""

from __future__ import annotations

import contextlib
import signal
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
        "diagnostics": {"every": 5},
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


def _snapshot(folder: Path) -> dict[str, dict[str, float]]:
    (last,) = folder.glob("*/last.pt")
    return torch.load(last, weights_only=False)["snapshots"][0]["layers"]


def test_one_and_two_processes_measure_the_same_step(tmp_path):
    """Step 1 from the same weights on the same global batch of 32: the diagnostics (sums
    exchanged, not each rank's statistics) and the step's loss agree; before, grad_std was
    exactly 2x and a unit silent on one rank's half batch counted as dead."""
    one = _config(tmp_path, "one", limit=400, max_steps=1)
    two = _config(tmp_path, "two", limit=400, max_steps=1)
    every = ["--set", "diagnostics.every=1"]
    assert _train(one, *every).returncode == 0
    out = _train(two, *every, nproc=2)
    assert out.returncode == 0, out.stdout + out.stderr
    a, b = _snapshot(tmp_path / "one"), _snapshot(tmp_path / "two")
    assert a.keys() == b.keys()
    for layer in a:
        assert a[layer].keys() == b[layer].keys()
        for stat in a[layer]:
            assert b[layer][stat] == pytest.approx(a[layer][stat], rel=1e-4, abs=1e-7), (
                layer,
                stat,
            )
    (la,) = (tmp_path / "one").glob("*/last.pt")
    (lb,) = (tmp_path / "two").glob("*/last.pt")
    loss_a = torch.load(la, weights_only=False)["history"][0]["train_loss"]
    loss_b = torch.load(lb, weights_only=False)["history"][0]["train_loss"]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)


def test_sigterm_stops_every_rank_and_the_resume_ends_where_an_unstopped_run_ends(tmp_path):
    """SIGTERM to ``convserve train --nproc-per-node 2`` after its first epoch: the CLI passes
    it to the ranks, which stop at one step; rank 0 keeps last.pt there and ends the MLflow
    run ``stopped`` without an error; no process is left. ``--resume`` then ends with the
    weights of a two-process run that never stopped, bit for bit, and finishes the run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole = _config(tmp_path, "whole", limit=1200, epochs=2)
    out = _train(whole, nproc=2)
    assert out.returncode == 0, out.stdout + out.stderr
    parts = _config(tmp_path, "parts", limit=1200, epochs=2)
    tracked = ["--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri={uri}"]
    argv = [CLI, "train", "--config", str(parts), *tracked, "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=limit(60)) == 1, "".join(lines)
    text = "".join(lines)
    assert "status: stopped" in text and "Traceback" not in text, text
    assert not [p for p in _processes() if str(parts) in p], "a rank outlived the CLI"
    (last,) = (tmp_path / "parts").glob("*/last.pt")
    saved = torch.load(last, weights_only=False)
    assert saved["position"]["epoch"] == 2 and not saved["finished"]
    client = MlflowClient(uri)
    run = client.get_run(saved["run_id"])
    assert (
        run.data.tags["convserve.status"] == "stopped" and "test_accuracy" not in run.data.metrics
    )
    out = _train(parts, "--resume", str(last), nproc=2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _equal_weights(_weights(tmp_path / "whole"), _weights(tmp_path / "parts"))
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["convserve.status"] == "finished"
    assert "convserve.message" not in run.data.tags
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 1


def _processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            found.append(cmdline.read_bytes().replace(b"\0", b" ").decode())
    return found


def _equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
