"""docker-compose.yml deployed: every service's command, environment and health check as the
file states them, each in its image's environment (``images.py``), with the host names and
ports on this machine (``local.py``), this machine's PostgreSQL in place of the postgres
container, Redis and Debian's nginx run with the compose file's own command and configuration.

It shows what a user of ``docker compose up`` relies on: bootstrap trains and promotes a first
model, the API follows the champion behind the load balancer, a job through the worker
registers a version that the API then serves, MLflow serves its UI and the artifacts, and
every health check passes."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import TINY
from tests.deploy.compose import ROOT, load, read_env
from tests.deploy.local import Container, Deployment, http_ok
from tests.deploy.test_load_balancer import _png, nginx

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
TOKEN = "compose-token"


def _mounts(service: dict, volumes: Path) -> dict[str, Path]:
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = ROOT / source if source.startswith("./") else volumes / source
        mounts[target].mkdir(parents=True, exist_ok=True)
    return mounts


@pytest.fixture
def optuna_database():  # type: ignore[no-untyped-def]
    """The name the postgres image's init script creates; dropped afterwards."""
    import psycopg2

    name = f"convserve_optuna_{uuid.uuid4().hex[:8]}"
    yield name
    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


def test_docker_compose_up_as_the_images_run_it(tmp_path, postgres_database, optuna_database):
    # A weak first model (identical weights: the symmetry problem), so that the job's model
    # beats it and is promoted; a YAML file, as a user would mount one.
    first = {**TINY, "init": {"name": "constant", "value": 0.05}, "tracking": {}}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "first.yaml").write_text(yaml.safe_dump(first))
    dotenv = {
        **read_env(ROOT / ".env.example"),
        # this machine's PostgreSQL: trust authentication, a database of this test's own
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": postgres_database,
        "OPTUNA_DB": optuna_database,
        "CONVSERVE_API_TOKEN": TOKEN,
        "CONVSERVE_POLL_INTERVAL": "0.5",
        "CONVSERVE_WORKERS": "1",
        "CONVSERVE_BOOTSTRAP_CONFIG": "/config/first.yaml",  # mounted, as a user would
    }
    services = load(dotenv)["services"]
    hosts = {"postgres": 5432, "redis": 6379, "mlflow": 5000, "api": 8000, "lb": 8080}
    d = Deployment(tmp_path, hosts)
    d.ports["postgres"] = 5432  # the machine's own server
    volumes = tmp_path / "volumes"

    def container(name: str, image: str | None) -> Container:
        s = services[name]
        argv, env = list(s.get("command", [])), dict(s.get("environment", {}))
        return Container(name, image, argv, env, _mounts(s, volumes))

    try:
        # postgres: the image's init script makes Optuna's database on a new volume
        postgres = container("postgres", None)
        init = postgres.mounts["/docker-entrypoint-initdb.d"] / "10-optuna.sh"
        postgres.argv = ["/bin/sh", str(init)]
        assert d.run(postgres, timeout=60).returncode == 0, d.log("postgres")

        redis = container("redis", None)
        # the redis image's working directory is its /data volume
        redis.argv += ["--port", str(d.ports["redis"]), "--dir", "/data"]
        d.start(redis)

        mlflow = d.start(container("mlflow", "mlflow"))
        d.wait("MLflow answers /health", lambda: http_ok(f"{d.url('mlflow')}/health"), 180)
        assert mlflow.poll() is None

        bootstrap = container("bootstrap", "trainer")
        bootstrap.mounts["/config"] = tmp_path / "config"
        first_run = d.run(bootstrap, timeout=600)
        assert first_run.returncode == 0, first_run.stdout[-3000:]
        again = d.run(bootstrap, timeout=300)  # `docker compose up` again
        assert again.returncode == 0 and "exists: nothing to do" in again.stdout

        d.start(container("worker", "trainer"))
        d.start(container("api", "api"))
        d.wait("the API is ready", lambda: http_ok(f"{d.url('api')}/readyz"), 180)
        with nginx(tmp_path / "lb", [d.ports["api"]]) as lb:
            d.ports["lb"] = int(lb.rsplit(":", 1)[1])
            d.containers["lb"] = Container("lb", None, [], {})
            _every_health_check_passes(d, services)
            _serves_the_champion_then_the_jobs_version(d, lb)
        _mlflow_serves_its_ui_and_the_artifacts(d)
        for name in ("api", "mlflow"):  # a read-only /app for the non-root user
            assert d.written(name) == [], name
    finally:
        d.stop()


def _every_health_check_passes(d: Deployment, services: dict) -> None:
    checked = []
    for name, service in services.items():
        if "healthcheck" not in service:
            continue
        kind, *argv = service["healthcheck"]["test"]
        retries = service["healthcheck"].get("retries", 3) + 10

        def passes(name: str = name, kind: str = kind, argv: list[str] = argv) -> bool:
            return d.check(name, argv, shell=kind == "CMD-SHELL")[0] == 0

        d.wait(f"{name}'s health check passes: {argv}", passes, retries * 3)
        checked.append(name)
    assert set(checked) == {"postgres", "redis", "mlflow", "worker", "api", "lb"}


def _serves_the_champion_then_the_jobs_version(d: Deployment, lb: str) -> None:
    with httpx.Client(base_url=lb, timeout=30) as http:
        r = http.post("/predict", files={"file": ("x.png", _png())})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == "1"
        job = http.post(
            "/jobs",
            json={"train": {**TINY, "tracking": {}}},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]

        def done() -> dict | None:
            state = http.get(f"/jobs/{job_id}").json()
            return state if state["status"] in ("succeeded", "failed", "cancelled") else None

        state = d.wait("the job ends", done, 600)
        assert state["status"] == "succeeded" and state["promoted"] is True, state

        def serving_v2() -> bool:
            r = http.post("/predict", files={"file": ("x.png", _png())})
            return r.status_code == 200 and r.json()["model"]["version"] == "2"

        d.wait("the API serves the job's version", serving_v2, 120)
        assert (
            http.post("/predict", files={"file": ("x.png", _png())}).json()["model"]["run_id"]
            == job_id
        )


def _mlflow_serves_its_ui_and_the_artifacts(d: Deployment) -> None:
    url = d.url("mlflow")
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    api = f"{url}/api/2.0/mlflow"
    version = httpx.get(
        f"{api}/model-versions/get", params={"name": "convserve", "version": "2"}
    ).json()["model_version"]
    run = httpx.get(f"{api}/runs/get", params={"run_id": version["run_id"]}).json()["run"]
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:"), run["info"]  # proxied
    root = run["info"]["artifact_uri"].split(":", 1)[1].lstrip("/")
    listing = httpx.get(
        f"{url}/api/2.0/mlflow-artifacts/artifacts", params={"path": f"{root}/model"}
    )
    files = [f"model/{f['path']}" for f in listing.json()["files"]]
    (onnx,) = [f for f in files if f.endswith(".onnx")]
    blob = httpx.get(f"{url}/api/2.0/mlflow-artifacts/artifacts/{root}/{onnx}", timeout=30)
    assert blob.status_code == 200 and len(blob.content) > 1000
    # the Host header of another name is refused (DNS rebinding), the service's is not
    health = f"{api}/experiments/get-by-name?experiment_name=Default"
    assert httpx.get(health, headers={"Host": "evil.example"}).status_code == 403
    assert httpx.get(health, headers={"Host": "mlflow:5000"}).status_code == 200
