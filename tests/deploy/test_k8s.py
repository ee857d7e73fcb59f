"""The Kubernetes manifests (deploy/k8s): every kustomization renders, every object is valid
against the Kubernetes schemas (kubernetes-validate, strict: no unknown field), and the
objects say what the design says (probes, resources, autoscaling, secrets, GPU, KServe)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from tests.deploy.compose import ROOT

K8S = ROOT / "deploy" / "k8s"
VERSION = "1.32.0"
SECRET_EXAMPLE = K8S / "base" / "secret.example.env"
SECRET_KEYS = set(
    line.split("=", 1)[0]
    for line in SECRET_EXAMPLE.read_text().splitlines()
    if line and not line.startswith("#")
)


def render(folder: str, secret_env: str | None = None) -> list[dict[str, Any]]:
    """``kustomize build`` (or ``kubectl kustomize``) of one kustomization, as a user runs it:
    from a copy of deploy/k8s with ``base/secret.env`` made from the example (or
    ``secret_env``)."""
    if shutil.which("kustomize"):
        argv = ["kustomize", "build"]
    elif shutil.which("kubectl"):
        argv = ["kubectl", "kustomize"]
    else:
        pytest.fail("rendering the manifests needs kustomize or kubectl (1.21 or newer)")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(K8S, copy)
        (copy / "base" / "secret.env").write_text(secret_env or SECRET_EXAMPLE.read_text())
        out = subprocess.run([*argv, str(copy / folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/gpu", "kserve"])
def rendered(request):
    return request.param, render(request.param)


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a Deployment or Job, or an InferenceService's predictor; None for
    others."""
    if doc["kind"] not in ("Deployment", "Job", "InferenceService"):
        return None
    spec = doc.get("spec", {})
    return spec.get("template", {}).get("spec") or spec.get("predictor")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered):
    _, docs = rendered
    assert docs
    for doc in docs:
        if doc["kind"] == "InferenceService":  # a KServe CRD: its predictor is a pod spec
            predictor = dict(doc["spec"]["predictor"])
            for key in ("minReplicas", "maxReplicas"):
                predictor.pop(key)
            doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": predictor}
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_validation_refuses_a_misspelt_field():
    (doc,) = [d for d in render("base") if d["kind"] == "Deployment"][:1]
    container(doc)["readinesProbe"] = container(doc).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_api_is_probed_sized_scaled_and_served():
    docs = render("base")
    api = by_kind(docs, "Deployment", "convserve-api")
    c = container(api)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "convserve-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "convserve-api",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    labels = api["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        doc = by_kind(docs, kind, "convserve-api")
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    assert labels["app.kubernetes.io/part-of"] == "convserve"
    mlflow = by_kind(docs, "Service", "mlflow")
    config = by_kind(docs, "ConfigMap", "convserve")
    assert (
        config["data"]["MLFLOW_TRACKING_URI"]
        == f"http://mlflow:{mlflow['spec']['ports'][0]['port']}"
    )


def test_secrets_come_from_the_generated_secret_and_every_key_is_documented():
    docs = render("base") + render("kserve")
    used = set()
    for doc in docs:
        spec = pod_spec(doc)
        if not spec:
            continue
        for c in spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "convserve"
                    used.add(ref["key"])
                else:
                    assert "TOKEN" not in env["name"] and "PASSWORD" not in env["name"]
            # nothing from the Secret is put on a command line by $(VAR) expansion
            secret_vars = {
                e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
            }
            assert not [a for a in c.get("args", []) for v in secret_vars if f"$({v})" in a]
    assert used == SECRET_KEYS
    (secret,) = [d for d in render("base", "CONVSERVE_API_TOKEN=s3cret\n") if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "convserve"  # the name deploy/k8s/kserve refers to
    import base64

    assert base64.b64decode(secret["data"]["CONVSERVE_API_TOKEN"]) == b"s3cret"
    assert "secret.env" in (ROOT / ".gitignore").read_text()  # the real one stays out of git


# The Pod Security Standard "restricted"
# (kubernetes.io/docs/concepts/security/pod-security-standards)
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.mark.parametrize("folder", ["base", "overlays/gpu", "kserve"])
def test_every_pod_passes_pod_security_restricted_with_a_read_only_root(folder):
    pods = [(d["metadata"]["name"], pod_spec(d)) for d in render(folder) if pod_spec(d)]
    assert pods
    for name, spec in pods:
        pod_ctx = spec.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True and pod_ctx.get("runAsUser", 0) != 0, name
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            assert set(volume) - {"name"} <= _RESTRICTED_VOLUMES, (name, volume)
        for c in spec["containers"] + spec.get("initContainers", []):
            ctx = c.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
            assert not ctx.get("privileged") and not ctx.get("capabilities", {}).get("add")
            assert ctx.get("readOnlyRootFilesystem") is True, (name, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], (name, "/tmp is written")


def test_mlflow_answers_its_in_cluster_names_on_any_port_and_no_other():
    """MLflow's allowed hosts, as the pod's environment expands them, checked with MLflow's
    own matcher."""
    from mlflow.server.security_utils import is_allowed_host_header

    mlflow = container(by_kind(render("base"), "Deployment", "mlflow"))
    env = {e["name"]: e.get("value", "") for e in mlflow["env"]}
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].replace("$(POD_NAMESPACE)", "ml")
    hosts = hosts.replace("$(MLFLOW_EXTRA_ALLOWED_HOSTS)", "mlflow.example.com")
    allowed = [h for h in hosts.split(",") if h]
    for host in (
        "mlflow:5000",
        "mlflow",
        "mlflow.ml:5000",
        "mlflow.ml.svc:80",
        "mlflow.ml.svc.cluster.local:5000",
        "mlflow.ml.svc.cluster.local",
        "localhost:5000",
        "127.0.0.1:8080",
        "mlflow.example.com",
    ):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example", "mlflow.evil.example:5000", "mlflow.other.svc:5000"):
        assert not is_allowed_host_header(allowed, host), host
    assert next(e for e in mlflow["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")["valueFrom"]


def test_network_policies_let_only_convserve_reach_mlflow_redis_and_postgresql():
    docs = render("base")
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}

    def admitted(target: str) -> set[str]:
        (spec,) = [
            s
            for s in policies.values()
            if s["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == target
        ]
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        (peer,) = rule["from"]
        (expr,) = peer["podSelector"]["matchExpressions"]
        return set(expr["values"])

    assert admitted("mlflow") == {"convserve-api", "convserve-worker", "convserve-bootstrap"}
    assert admitted("redis") == {"convserve-api", "convserve-worker"}
    assert admitted("postgresql") == {"mlflow", "convserve-worker"}
    names = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }
    assert {"convserve-api", "convserve-worker", "convserve-bootstrap", "mlflow"} <= names
    closed = policies["convserve-no-ingress"]
    assert "ingress" not in closed and closed["policyTypes"] == ["Ingress"]


def test_the_autoscaler_target_matches_the_pods_cpu_and_processes():
    docs = render("base")
    api = container(by_kind(docs, "Deployment", "convserve-api"))
    config = by_kind(docs, "ConfigMap", "convserve")["data"]
    processes = int(config["CONVSERVE_WORKERS"])
    # each process keeps at most one core busy (its onnxruntime threads share the pod's cores)
    assert (
        api["resources"]["requests"]["cpu"] == api["resources"]["limits"]["cpu"] == str(processes)
    )
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "convserve-api")
    (metric,) = hpa["spec"]["metrics"]
    assert 50 <= metric["resource"]["target"]["averageUtilization"] <= 90


def test_the_first_model_job_and_the_worker_probes():
    docs = render("base")
    job = by_kind(docs, "Job", "convserve-bootstrap")
    c = container(job)
    assert c["args"][:2] == ["convserve", "bootstrap"] and c["image"].startswith(
        "convserve/trainer:"
    )
    config = by_kind(docs, "ConfigMap", "convserve")["data"]
    model = c["args"][c["args"].index("--model-name") + 1]
    assert config["CONVSERVE_MODEL_URI"] == f"models:/{model}@champion"
    assert job["spec"]["backoffLimit"] >= 3  # MLflow may be starting
    worker = container(by_kind(docs, "Deployment", "convserve-worker"))
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["convserve", "worker", "--check"]


def test_the_gpu_overlay_asks_for_gpus_and_the_cuda_images():
    docs = render("overlays/gpu")
    api = container(by_kind(docs, "Deployment", "convserve-api"))
    worker = container(by_kind(docs, "Deployment", "convserve-worker"))
    for c in (api, worker):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert api["image"].startswith("convserve/api-gpu:")
    assert worker["image"].startswith("convserve/trainer-gpu:")
    env = {e["name"]: e.get("value") for e in api["env"]}
    assert env["CONVSERVE_DEVICE"] == "cuda" and env["CONVSERVE_API_TOKEN"] is None
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the base is kept


def test_kserve_runs_the_api_image_speaking_the_v2_protocol():
    (isvc,) = render("kserve")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (c,) = isvc["spec"]["predictor"]["containers"]
    assert c["name"] == "kserve-container" and c["image"].startswith("convserve/api:")
    assert c["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_every_container_command_is_one_the_cli_has():
    """Each ``convserve`` command and option a manifest runs exists."""
    from convserve.cli import app

    runner = CliRunner()
    docs = render("base") + render("kserve")
    for doc in docs:
        for c in (pod_spec(doc) or {}).get("containers", []):
            if c["args"][0] != "convserve":
                continue
            result = runner.invoke(app, [*c["args"][1:2], "--help"], terminal_width=200)
            assert result.exit_code == 0, c["args"]
            for flag in (a for a in c["args"] if a.startswith("--")):
                assert flag in result.output, (c["args"], flag)
