"""The ``convserve`` command as a user runs it: a real process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import TINY
from tests.waiting import limit

CLI = str(Path(sys.executable).parent / "convserve")


def _run(*args, cwd, env=None):
    """The command as a user in a plain folder runs it: no MLflow server, no stack settings."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "CONVSERVE_")) and k != "REDIS_URL"
    }
    env = {**clean, **(env or {})}
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=limit(300), env=env
    )


def _config(tmp_path, **changes):
    data = {**TINY, **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_prints_metrics_diagnosis_and_run_id(tmp_path):
    cfg = _config(tmp_path, tracking={"enabled": True})
    out = _run(
        "train",
        "--config",
        str(cfg),
        "--set",
        "optim.epochs=2",
        "--set",
        "model.activation=tanh",
        "--set",
        "init.name=xavier_uniform",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "val_accuracy" in out.stdout and "diagnosis: healthy" in out.stdout
    run_id = out.stdout.split("MLflow run id:")[1].split()[0]
    run = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(run_id)
    assert run.data.params["model.activation"] == "tanh"
    assert run.data.params["init.name"] == "xavier_uniform"
    assert run.info.run_name == "digits-tanh-xavier_uniform-8"
    assert (tmp_path / "runs" / run_id / "best.pt").exists()
    # everything a plain `convserve train` writes is under ./runs: store, artifacts, checkpoints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "tiny.yaml"]
    artifacts = tmp_path / "runs" / "mlartifacts" / "convserve" / run_id / "artifacts"
    assert (artifacts / "checkpoints" / "best.pt").exists()


def test_bad_config_exits_2_with_the_field(tmp_path):
    out = _run("train", "--set", "model.activation=swish", cwd=tmp_path)
    assert out.returncode == 2
    assert "model.activation" in out.stderr and "'leaky_relu'" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run("train", "--config", "missing.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "shipped configs" in out.stderr


def test_diverged_run_exits_1_without_a_traceback(tmp_path):
    cfg = _config(
        tmp_path,
        model={"blocks": [{"out_channels": 8, "pool": "none"}] * 3, "hidden": [32, 32]},
        init={"name": "he_normal", "scale": 6.0},
        optim={"optimizer": "sgd", "lr": 0.1, "epochs": 1},
    )
    out = _run("train", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1
    assert "diverged" in out.stdout and "exploding" in out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def test_version_and_help(tmp_path):
    out = _run("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("convserve ")
    out = _run("train", "--help", cwd=tmp_path)
    assert "--set" in out.stdout and "default" in out.stdout


def test_export_a_checkpoint_without_registering(tmp_path):
    cfg = _config(tmp_path)
    out = _run("train", "--config", str(cfg), "--set", "optim.max_steps=5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ckpt = next((tmp_path / "runs").glob("*/best.pt"))
    out = _run(
        "export",
        "--checkpoint",
        str(ckpt),
        "--no-register",
        "-o",
        str(tmp_path / "m.onnx"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.onnx").exists() and "max |onnx - torch|" in out.stdout


def test_sweep_command_registers_and_promotes_the_best(tmp_path):
    sweep = {
        "name": "cli",
        "base": {
            **TINY,
            "tracking": {"enabled": True},
            "optim": {**TINY["optim"], "max_steps": 10},
        },
        "grid": {"model.activation": ["relu", "tanh"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = _run("sweep", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "registered: models:/convserve/1" in out.stdout
    said = " ".join(out.stdout.split())  # the console wraps at its width
    assert "alias: champion (no champion yet; best_val_accuracy 0." in said


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["train", "--set", "model.activation=swish"], "model.activation"),
        (["sweep", "--config", "missing.yaml"], "no sweep file 'missing.yaml'"),
        (["export"], "exactly one of --run-id and --checkpoint"),
        (["export", "--checkpoint", "x.pt", "--direction", "up"], "--direction must be"),
    ],
)
def test_a_bad_call_is_refused_before_torch_is_imported(tmp_path, argv, said):
    """A wrong config or option is said at once, not after the seconds torch takes."""
    code = (
        "import sys\n"
        "from convserve.cli import app\n"
        "try:\n"
        f"    app({argv!r})\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert said in out.stderr


def test_help_reads_as_sentences(tmp_path):
    out = _run("--help", cwd=tmp_path, env={"COLUMNS": "120"})
    assert "<bool>" not in out.stdout
    worker = next(line for line in out.stdout.splitlines() if "│ worker" in line)
    assert "RedisHuey when REDIS_URL is set (any number" in worker  # reflowed, not hard-wrapped
    out = _run("sweep", "--help", cwd=tmp_path, env={"COLUMNS": "120"})
    assert "--register" in out.stdout and "<bool>" not in out.stdout


def test_experiments_help_lists_every_registered_experiment(tmp_path):
    """The help reads the registry, and the registry is what the experiment modules define."""
    import importlib

    from convserve.pipelines.experiment_names import REGISTRY
    from convserve.pipelines.experiments import EXPERIMENTS, experiment

    for module in set(REGISTRY.values()):
        importlib.import_module(f"convserve.pipelines.experiments.{module}")
    assert sorted(EXPERIMENTS) == sorted(REGISTRY) and len(REGISTRY) == 11
    with pytest.raises(ValueError, match="REGISTRY does not list it"):
        experiment("unlisted")(lambda context: None)  # type: ignore[arg-type,return-value]
    out = _run("experiments", "--help", cwd=tmp_path, env={"COLUMNS": "400"})
    listed = out.stdout.split("several):", 1)[1].split(".", 1)[0]
    names = [n.strip(" │\n") for n in listed.replace("│", " ").split(",")]
    assert [" ".join(n.split()) for n in names] == list(REGISTRY), out.stdout


def test_serve_on_cuda_without_cuda_says_so(tmp_path):
    """The device is checked by the server process the command runs in its place (where
    onnxruntime is imported once): the same line and exit status as any bad setting."""
    out = _run("serve", "--device", "cuda", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: CONVSERVE_DEVICE=cuda, but this onnxruntime build has no ")
    assert "Traceback" not in out.stderr


def test_a_bad_setting_is_named_as_the_user_sets_it(tmp_path):
    """``serve`` and ``worker`` refuse a wrong setting with a line each, naming the
    environment variable (and the option where there is one), with exit status 2."""
    env = {"CONVSERVE_MAX_BATCH_SIZE": "0", "CONVSERVE_WORKER_LOST_AFTER": "soon"}
    out = _run("serve", "--port", "99999", cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == "error: bad settings:"
    assert "  CONVSERVE_MAX_BATCH_SIZE: Input should be greater than or equal to 1" in lines
    assert "  --port (CONVSERVE_PORT): Input should be less than or equal to 65535" in lines
    out = _run("worker", cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[:2] == [
        "error: bad setting:",
        "  CONVSERVE_WORKER_LOST_AFTER: Input should be a valid number, unable to parse string "
        "as a number",
    ]
    assert "errors.pydantic.dev" not in out.stderr
