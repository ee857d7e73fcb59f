"""The structure of docker-compose.yml (there is no Docker engine here)."""

import shlex

import pytest

from tests.deploy.compose import ROOT, interpolate, load, read_env

SERVICES = {"postgres", "redis", "mlflow", "api", "lb", "worker", "bootstrap"}


@pytest.fixture(scope="module")
def compose():
    return load(read_env(ROOT / ".env.example"))


def test_every_service_of_the_design(compose):
    assert set(compose["services"]) == SERVICES


def test_health_checks_and_health_conditions(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "mlflow", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert "readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "bootstrap"):
        assert services[name]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["bootstrap"]["restart"] == "no"


def test_stateful_services_have_volumes(compose):
    services = compose["services"]
    assert any("/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert "--appendonly" in services["redis"]["command"]
    assert any(v.endswith(":/mlartifacts") for v in services["mlflow"]["volumes"])
    mounts = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    named = {m for m in mounts if not m.startswith("./")}  # ./...: files of this repository
    assert named <= set(compose["volumes"])
    assert all((ROOT / m).exists() for m in mounts - named)


def test_only_the_load_balancer_and_mlflow_publish_ports(compose):
    """So that `docker compose up --scale api=3` works: replicas publish nothing."""
    services = compose["services"]
    assert {n for n, s in services.items() if s.get("ports")} == {"lb", "mlflow"}
    assert services["lb"]["ports"] == ["8000:8080"]
    assert services["api"]["expose"] == ["8000"]
    assert services["lb"]["image"].startswith("nginx:")
    mount = "./deploy/nginx/convserve.conf:/etc/nginx/conf.d/default.conf:ro"
    assert mount in services["lb"]["volumes"]
    assert (ROOT / "deploy" / "nginx" / "convserve.conf").read_text().count("server api:8000") == 1


def test_sweeps_keep_their_studies_in_a_second_postgres_database(compose):
    services = compose["services"]
    storage = services["worker"]["environment"]["CONVSERVE_STUDY_STORAGE"]
    assert storage == "postgresql+psycopg2://convserve:change-me@postgres:5432/optuna"
    assert services["postgres"]["environment"]["OPTUNA_DB"] == "optuna"
    assert "./deploy/postgres:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    script = ROOT / "deploy" / "postgres" / "10-optuna.sh"
    assert script.stat().st_mode & 0o111 and "CREATE DATABASE" in script.read_text()


def test_docker_compose_accepts_the_files(tmp_path):
    """Debian's docker-compose validates the stack and the GPU override without an engine."""
    import shutil
    import subprocess

    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: `make test-deps` installs Debian's")
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    for files in (["docker-compose.yml"], ["docker-compose.yml", "deploy/compose.gpu.yml"]):
        argv = ["docker-compose", "--env-file", str(env_file)]
        for f in files:
            argv += ["-f", str(ROOT / f)]
        out = subprocess.run([*argv, "config"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "lb:" in out.stdout


def test_each_program_gets_the_environment_it_needs(compose):
    services = compose["services"]
    for name in ("api", "worker", "bootstrap"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for name in ("api", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    api = services["api"]["environment"]
    assert api["CONVSERVE_MODEL_URI"] == "models:/convserve@champion"
    assert api["CONVSERVE_API_TOKEN"] == "change-me-too"
    mlflow = shlex.split(services["mlflow"]["command"])
    assert "postgresql+psycopg2://convserve:change-me@postgres:5432/mlflow" in mlflow
    hosts = mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in hosts and "--serve-artifacts" in mlflow


def test_no_secret_is_baked_in():
    raw = load()
    assert (
        "${POSTGRES_PASSWORD:?" in raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    )
    assert "${CONVSERVE_API_TOKEN:?" in raw["services"]["api"]["environment"]["CONVSERVE_API_TOKEN"]
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        interpolate(raw, {})
    for dockerfile in (ROOT / "deploy").glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert "TOKEN" not in text and "PASSWORD" not in text
        assert "USER " in text  # non-root


def test_api_image_has_no_torch_and_installs_dependencies_before_code():
    text = (ROOT / "deploy" / "Dockerfile.api").read_text()
    assert "'training'" not in text and "'service'" in text  # no torch
    assert text.index("pip install -r") < text.index("COPY src")
    assert "python:3.11-slim" in text


def test_gpu_override_reserves_nvidia_devices():
    import yaml

    gpu = yaml.safe_load((ROOT / "deploy" / "compose.gpu.yml").read_text())["services"]
    for name in ("api", "worker"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["api"]["build"]["args"]["ONNXRUNTIME_PACKAGE"] == "onnxruntime-gpu[cuda,cudnn]"
    assert gpu["api"]["environment"]["CONVSERVE_DEVICE"] == "cuda"
    assert gpu["worker"]["build"]["args"]["TORCH_INDEX"] == "https://pypi.org/simple"


def _build_checks(dockerfile: str, args: dict[str, str]) -> list[str]:
    """The ``python -c`` checks a Dockerfile's RUN steps make, with ``args`` put in."""
    import re

    text = (ROOT / "deploy" / dockerfile).read_text().replace("\\\n", "")
    scripts = re.findall(r'python -c "(.*?)"(?:\s|$)', text)
    for name, value in args.items():
        scripts = [s.replace(f"${name}", value) for s in scripts]
    return [s for s in scripts if "tomllib" not in s]


def _run_checks(scripts: list[str]) -> list[int]:
    import subprocess
    import sys

    return [
        subprocess.run([sys.executable, "-c", s], capture_output=True).returncode for s in scripts
    ]


def test_the_api_image_checks_its_onnxruntime_at_build_time():
    """The build-time check, run here on this machine's CPU onnxruntime: it passes for the CPU
    image and stops the GPU image's build (no CUDA provider in this build)."""
    cpu = _build_checks("Dockerfile.api", {"ONNXRUNTIME_PACKAGE": "onnxruntime"})
    assert cpu and "get_available_providers" in cpu[0]
    assert _run_checks(cpu[:1]) == [0]
    gpu = _build_checks("Dockerfile.api", {"ONNXRUNTIME_PACKAGE": "onnxruntime-gpu[cuda,cudnn]"})
    assert _run_checks(gpu[:1]) == [1]


def test_the_trainer_image_takes_the_torch_build_it_asks_for():
    """CPU images install torch from PyTorch's CPU index; the check refuses a CUDA build
    there (this machine's torch is one) and takes it for the GPU image."""
    text = (ROOT / "deploy" / "Dockerfile.trainer").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert text.index('--index-url "$TORCH_INDEX"') < text.index("pip install -r /tmp/req.txt")
    import torch

    cpu_index = {"TORCH_INDEX": "https://download.pytorch.org/whl/cpu"}
    (cpu,) = _build_checks("Dockerfile.trainer", cpu_index)
    (gpu,) = _build_checks("Dockerfile.trainer", {"TORCH_INDEX": "https://pypi.org/simple"})
    cuda_build = torch.version.cuda is not None
    assert _run_checks([cpu, gpu]) == ([1, 0] if cuda_build else [0, 1])
