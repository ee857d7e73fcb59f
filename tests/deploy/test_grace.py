"""Each deployment gives its processes the time they drain in: the worker's drain limit and
the API's shutdown delay sit below compose's stop_grace_period and Kubernetes'
terminationGracePeriodSeconds, with the same figures in both."""

from __future__ import annotations

import yaml

from tests.deploy.compose import ROOT


def _seconds(text: str) -> float:
    return float(str(text).removesuffix("s"))


def _k8s_env(name: str) -> tuple[dict[str, str], float]:
    (doc,) = [
        d
        for d in yaml.safe_load_all((ROOT / "deploy/k8s/base" / f"{name}.yaml").read_text())
        if d and d["kind"] == "Deployment"
    ]
    pod = doc["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
    return env, float(pod["terminationGracePeriodSeconds"])


def test_drain_limits_sit_below_the_grace_periods_and_agree():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    pairs = {"worker": "CONVSERVE_DRAIN_SECONDS", "api": "CONVSERVE_SHUTDOWN_DELAY"}
    for service, name in pairs.items():
        limit = float(compose[service]["environment"][name])
        assert limit < _seconds(compose[service]["stop_grace_period"]), service
        env, grace = _k8s_env(service)
        assert float(env[name]) == limit and limit < grace, service
