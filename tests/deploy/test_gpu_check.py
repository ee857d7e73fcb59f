"""benchmarks/gpu_check.sh, the check run on machines with a GPU, kept working here: with
``--device cpu`` it runs every step (train, export, provider parity, serve) on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.compose import ROOT
from tests.waiting import limit

pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_end_to_end_on_the_cpu():
    env = {"PYTHON": sys.executable, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    # this test process's share of the cores (tests/conftest.py), as every other test's
    env.update({k: v for k, v in os.environ.items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    out = subprocess.run(
        [
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--steps",
            "30",
            "--seconds",
            "0.3",
            "--set",
            "data.limit=1500",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=limit(300),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    assert any(line.startswith("1. trained on cpu: finished") for line in lines)
    assert any("providers ['CPUExecutionProvider']" in line for line in lines)
    parity = [line for line in lines if "/predict vs CPU provider" in line]
    assert parity and "req/s at concurrency 1" in parity[0]


def test_the_gpu_check_refuses_a_machine_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        timeout=limit(120),
    )
    assert out.returncode == 1 and "torch sees no CUDA device" in out.stdout
