"""The Kubernetes manifests (deploy/k8s): every kustomization renders, every object is valid
against the Kubernetes schemas (kubernetes-validate, strict: no unknown field), and the
objects say what the design says (probes, resources, autoscaling, secrets, GPU, KServe)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from tests.deploy.compose import ROOT

K8S = ROOT / "deploy" / "k8s"
VERSION = "1.32.0"
SECRET_KEYS = set(
    line.split("=", 1)[0]
    for line in (K8S / "secret.example.env").read_text().splitlines()
    if line and not line.startswith("#")
)


def render(folder: str) -> list[dict[str, Any]]:
    """``kustomize build`` (or ``kubectl kustomize``) of one kustomization."""
    if shutil.which("kustomize"):
        argv = ["kustomize", "build", str(K8S / folder)]
    elif shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(K8S / folder)]
    else:
        pytest.fail("rendering the manifests needs kustomize or kubectl (1.21 or newer)")
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/gpu", "kserve"])
def rendered(request):
    return request.param, render(request.param)


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a Deployment, or an InferenceService's predictor; None for others."""
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


def test_secrets_come_from_the_secret_and_every_key_is_documented():
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
    assert used == SECRET_KEYS
    assert not [d for d in docs if d["kind"] == "Secret"]  # created by the user, never shipped


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
