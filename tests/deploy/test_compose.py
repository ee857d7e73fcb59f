"""The structure of docker-compose.yml (there is no Docker engine here)."""

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
    mlflow = services["mlflow"]
    assert (
        mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
        == "postgresql+psycopg2://convserve:change-me@postgres:5432/mlflow"
    )
    assert "--serve-artifacts" in mlflow["command"]
    hosts = mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"mlflow", "mlflow:*", "localhost:*", "127.0.0.1:*"} <= set(hosts)


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


def test_gpu_override_reserves_nvidia_devices():
    import yaml

    gpu = yaml.safe_load((ROOT / "deploy" / "compose.gpu.yml").read_text())["services"]
    for name in ("api", "worker"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["api"]["build"]["args"]["VARIANT"] == "gpu"
    assert gpu["api"]["environment"]["CONVSERVE_DEVICE"] == "cuda"


def test_every_service_built_here_has_a_health_check_and_so_does_its_image(compose):
    services = compose["services"]
    for name, service in services.items():
        if "build" in service and service.get("restart") != "no":
            assert service["healthcheck"]["test"], name
            dockerfile = (ROOT / service["build"]["dockerfile"]).read_text()
            assert "\nHEALTHCHECK " in dockerfile, name
