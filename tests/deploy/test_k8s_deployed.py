"""deploy/k8s/base deployed: each container's args and environment taken from the rendered
manifests (ConfigMap, the generated Secret, field and key references, ``$(VAR)``
expansion), run in its image's environment (``images.py``) with the Service names on this
machine's ports (``local.py``); PostgreSQL and Redis, which the manifests reach by URL, are
this machine's PostgreSQL and a Redis server of the test's own.

A fresh cluster gets its first model from the bootstrap Job, the API becomes ready and
answers, every probe passes, and no container writes outside its volumes (the root file
system is read-only in the pods)."""

from __future__ import annotations

import base64
import re
import shutil
import uuid

import httpx
import pytest

from tests.deploy.local import Container, Deployment, http_ok
from tests.deploy.test_k8s import render
from tests.deploy.test_load_balancer import _png

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
NAMESPACE = "convserve-test"
IMAGES = {"convserve/api": "api", "convserve/trainer": "trainer", "convserve/mlflow": "mlflow"}


def _environment(c: dict, config: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet makes it."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(config if "configMapRef" in source else secret)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"]
            )
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            env[e["name"]] = secret[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[e["name"]] = config.get(ref["configMapKeyRef"]["key"], "")
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[e["name"]] = NAMESPACE
    return env


def test_the_kubernetes_base_as_its_pods_run_it(tmp_path, postgres_database):
    import psycopg2

    optuna = f"convserve_optuna_{uuid.uuid4().hex[:8]}"
    d = Deployment(tmp_path, {"mlflow": 5000, "convserve-api": 8000, "redis": 6379})
    redis_port = d.ports["redis"]
    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {optuna}")
    pg = "postgresql+psycopg2://postgres@127.0.0.1:5432"
    secret_env = (
        "CONVSERVE_API_TOKEN=k8s-token\n"
        f"REDIS_URL=redis://127.0.0.1:{redis_port}/0\n"
        f"MLFLOW_BACKEND_STORE_URI={pg}/{postgres_database}\n"
        f"CONVSERVE_STUDY_STORAGE={pg}/{optuna}\n"
    )
    docs = render("base", secret_env)
    (config,) = [x["data"] for x in docs if x["kind"] == "ConfigMap"]
    (secret,) = [x["data"] for x in docs if x["kind"] == "Secret"]
    secret = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    pods = {
        x["metadata"]["name"]: x["spec"]["template"]["spec"]
        for x in docs
        if x["kind"] in ("Deployment", "Job")
    }

    def container(name: str) -> tuple[Container, dict]:
        (c,) = pods[name]["containers"]
        volumes = {v["name"]: v for v in pods[name].get("volumes", [])}
        mounts = {}
        for m in c.get("volumeMounts", []):
            claim = volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
            mounts[m["mountPath"]] = tmp_path / ("pvc-" + claim if claim else f"{name}-{m['name']}")
            mounts[m["mountPath"]].mkdir(parents=True, exist_ok=True)
        image = IMAGES[c["image"].split(":")[0]]
        env = _environment(c, config, secret)
        return Container(name, image, list(c["args"]), env, mounts, workdir="/app"), c

    try:
        d.start(
            Container("redis", None, ["redis-server", "--port", str(redis_port), "--save", ""], {})
        )
        mlflow, spec = container("mlflow")
        d.start(mlflow)
        probe = spec["readinessProbe"]["httpGet"]["path"]
        d.wait("MLflow is ready", lambda: http_ok(d.url("mlflow") + probe), 180)

        job, _ = container("convserve-bootstrap")
        first = d.run(job, timeout=900)
        assert first.returncode == 0, first.stdout[-3000:]
        again = d.run(job, timeout=300)  # the Job runs again after its TTL: nothing to do
        assert again.returncode == 0 and "exists: nothing to do" in again.stdout

        worker, worker_spec = container("convserve-worker")
        d.start(worker)
        api, api_spec = container("convserve-api")
        d.start(api)
        api_url = d.url("convserve-api")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = api_spec[kind]["httpGet"]["path"]
            d.wait(f"the API's {kind} passes", lambda p=path: http_ok(api_url + p), 180)
        for kind in ("startupProbe", "livenessProbe"):
            argv = worker_spec[kind]["exec"]["command"]
            d.wait(f"the worker's {kind}", lambda a=argv: d.check(worker.name, a)[0] == 0, 120)

        r = httpx.post(f"{api_url}/predict", files={"file": ("x.png", _png())}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == {
            "name": "convserve",
            "version": "1",
            "alias": "champion",
            "run_id": r.json()["model"]["run_id"],
        }
        d.stop()  # SIGTERM, as the kubelet does: nothing may then be left outside the volumes
        for name in ("mlflow", "convserve-bootstrap", "convserve-worker", "convserve-api"):
            assert d.written(name) == [], f"{name} writes to its read-only root file system"
    finally:
        d.stop()
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {optuna} WITH (FORCE)")
        conn.close()
        shutil.rmtree(tmp_path / "pvc-mlflow-artifacts", ignore_errors=True)
