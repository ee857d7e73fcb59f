"""The structure of docker-compose.yml (there is no Docker engine here)."""

import shlex

import pytest

from tests.deploy.compose import ROOT, interpolate, load, read_env

SERVICES = {"postgres", "redis", "mlflow", "api", "worker", "bootstrap"}


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
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert named <= set(compose["volumes"])


def test_only_the_api_and_mlflow_publish_ports(compose):
    services = compose["services"]
    assert {n for n, s in services.items() if s.get("ports")} == {"api", "mlflow"}


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
    assert gpu["api"]["build"]["args"]["ONNXRUNTIME_PACKAGE"] == "onnxruntime-gpu"
    assert gpu["api"]["environment"]["CONVSERVE_DEVICE"] == "cuda"
