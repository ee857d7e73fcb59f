"""The served set of models, end to end: a real ``convserve serve`` process (two workers)
following every registered model with a ``champion`` on a real MLflow server, addressed by
name on ``/predict`` and KServe v2, listed by ``/v1/models``, loaded and unloaded through the
repository API; and the memory budget's unloads and loads on demand."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.servers import free_port, mlflow_server, process, register_onnx, wait_http
from tests.waiting import limit, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

AUTH = {"Authorization": "Bearer tok"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow server of this module's own: the served set is every model in it."""
    with mlflow_server(tmp_path_factory.mktemp("models-mlflow")) as url:
        yield url


@contextmanager
def serve(mlflow_url: str, folder: Path, **settings: str) -> Iterator[httpx.Client]:
    """``convserve serve`` following ``models:/digits@champion`` with the shipped
    ``CONVSERVE_MODELS`` (every model with a champion) unless ``settings`` say otherwise."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CONVSERVE_MODELS"}
    env |= {
        "CONVSERVE_MODEL_URI": "models:/digits@champion",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_POLL_INTERVAL": "0.3",
        "CONVSERVE_CACHE_DIR": str(folder / "cache"),
        "CONVSERVE_API_TOKEN": "tok",
        "CONVSERVE_PORT": str(port),
        **settings,
    }
    cli = str(Path(sys.executable).parent / "convserve")
    with process([cli, "serve"], folder / f"serve-{port}.log", env, folder) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc, timeout=60)
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http


def _png(mode: str, size: int) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), 120 if mode == "L" else (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _predict(http: httpx.Client, model: str | None) -> httpx.Response:
    params = {"model": model} if model else {}
    return http.post("/predict", params=params, files={"file": ("x.png", _png("RGB", 16))})


def _steady(http: httpx.Client, model: str, status: int, what: str) -> httpx.Response:
    """Until 10 answers in a row for ``model`` have ``status``: with two workers, both do."""

    def settled() -> httpx.Response | None:
        answers = [_predict(http, model) for _ in range(10)]
        return answers[-1] if all(a.status_code == status for a in answers) else None

    return wait_until(settled, 60, what, 0.2)


def _register(client: MlflowClient, name: str, path: Path, champion: bool = True) -> str:
    version = register_onnx(client, name, onnx.load(str(path)))
    if champion:
        client.set_registered_model_alias(name, "champion", version)
    return version


def _served(http: httpx.Client) -> dict[str, dict]:  # type: ignore[type-arg]
    return {m["name"]: m for m in http.get("/v1/models").json()["models"]}


def test_every_champion_is_served_by_name_and_the_repository_api_loads_and_unloads(
    registry, onnx_path, rgb_onnx_path, tmp_path
):
    client = MlflowClient(registry)
    digits = _register(client, "digits", onnx_path)
    client.set_model_version_tag("digits", digits, "metric.best_val_accuracy", "0.875")
    _register(client, "shapes", rgb_onnx_path)
    spare = _register(client, "spare", onnx_path, champion=False)

    with serve(registry, tmp_path, CONVSERVE_WORKERS="2") as http:
        answer = _steady(http, "shapes", 200, "shapes served by both workers").json()
        assert answer["model"]["name"] == "shapes"
        assert len(answer["predictions"][0]["probabilities"]) == 9
        bare = _predict(http, None).json()  # the default model: digits, 10 classes
        assert bare["model"] == {
            "name": "digits",
            "version": digits,
            "alias": "champion",
            "run_id": bare["model"]["run_id"],
        }
        assert len(bare["predictions"][0]["probabilities"]) == 10

        listing = http.get("/v1/models").json()
        assert listing["default"] == "digits" and "memory_budget_bytes" not in listing
        served = {m["name"]: m for m in listing["models"]}
        assert set(served) == {"digits", "shapes"}  # spare has no champion
        assert served["digits"]["default"] and served["digits"]["dataset"] == "digits"
        assert served["digits"]["metrics"] == {"best_val_accuracy": 0.875}
        assert served["shapes"]["origin"] == "found" and served["shapes"]["dataset"] == "shapes"
        assert served["shapes"]["labels"] == 9 and served["shapes"]["memory_bytes"] > 0
        assert listing["memory_in_use_bytes"] >= served["shapes"]["memory_bytes"]

        # KServe v2: distinct models, each with its metadata, versions and readiness
        meta = http.get("/v2/models/shapes").json()
        assert meta["inputs"][0]["shape"] == [-1, 3, 16, 16] and meta["versions"] == ["1"]
        assert http.get("/v2/models/shapes/versions/1/ready").json()["ready"] is True
        assert http.get("/v2/models/shapes/versions/7/ready").status_code == 404
        assert http.get("/v2/models/digits").json()["inputs"][0]["shape"][1] == 1
        tensor = {
            "name": "image",
            "shape": [1, 3, 16, 16],
            "datatype": "FP32",
            "data": np.zeros(768).tolist(),
        }
        r = http.post("/v2/models/shapes/versions/1/infer", json={"inputs": [tensor]})
        assert r.status_code == 200 and r.json()["model_name"] == "shapes"
        r = http.post("/v2/models/digits/infer", json={"inputs": [tensor]})
        assert r.status_code == 400 and "does not match" in r.json()["error"]

        r = _predict(http, "spare")
        assert r.status_code == 404 and "'digits', 'shapes'" in r.json()["detail"]

        # registered and promoted while the server runs: served without a restart
        _register(client, "fresh", onnx_path)
        assert _steady(http, "fresh", 200, "fresh served").json()["model"]["name"] == "fresh"
        client.delete_registered_model_alias("fresh", "champion")
        _steady(http, "fresh", 404, "fresh no longer served once its champion is gone")

        # the repository API, as Triton's: the token, then every worker follows
        assert http.post("/v2/repository/models/shapes/unload").status_code == 401
        assert http.post("/v2/repository/models/shapes/unload", headers=AUTH).status_code == 200
        gone = _steady(http, "shapes", 404, "shapes unloaded in both workers").json()
        assert "unloaded by an admin" in gone["detail"]
        index = {e["name"]: e for e in http.post("/v2/repository/index", json={}).json()}
        assert index["shapes"] == {
            "name": "shapes",
            "version": None,
            "state": "UNAVAILABLE",
            "reason": "unloaded by an admin",
        }
        ready = http.post("/v2/repository/index", json={"ready": True}).json()
        assert [e["name"] for e in ready] == ["digits"]

        r = http.post(
            "/v2/repository/models/spare/load",
            headers=AUTH,
            json={"parameters": {"version": spare}},
        )
        assert r.status_code == 200, r.text
        _steady(http, "spare", 200, "spare, pinned, served by both workers")
        assert _served(http)["spare"]["origin"] == "loaded"
        assert _served(http)["spare"]["uri"] == f"models:/spare/{spare}"
        assert http.post("/v2/repository/models/shapes/load", headers=AUTH).status_code == 200
        _steady(http, "shapes", 200, "shapes back in both workers")

        r = http.post("/v2/repository/models/digits/unload", headers=AUTH)
        assert r.status_code == 400 and "default model" in r.json()["error"]
        r = http.post("/v2/repository/models/nothing/load", headers=AUTH)
        assert r.status_code == 400 and "failed to load 'nothing'" in r.json()["error"]
        assert "nothing" not in _served(http)
        r = http.post("/admin/reload", params={"model": "shapes"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["model"] == "shapes"
        assert http.post("/admin/reload", params={"model": "x"}, headers=AUTH).status_code == 404


def test_a_memory_budget_unloads_the_least_recently_used_and_loads_on_the_next_request(
    registry, onnx_path, rgb_onnx_path, tmp_path
):
    """1 MiB a process, which the default model alone takes: each model loaded unloads the
    other one; a request for an unloaded model is answered 503 with Retry-After at once and
    starts its load."""
    client = MlflowClient(registry)
    if not client.search_registered_models("name = 'digits'"):  # run alone
        _register(client, "digits", onnx_path)
    _register(client, "budget-a", onnx_path)
    _register(client, "budget-b", rgb_onnx_path)
    settings = {"CONVSERVE_MODELS": "budget-*", "CONVSERVE_MODEL_MEMORY_MB": "1"}
    with serve(registry, tmp_path, **settings) as http:
        listing = http.get("/v1/models").json()
        assert listing["memory_budget_bytes"] == 1 << 20
        assert listing["memory_in_use_bytes"] > 1 << 20  # the default model is never unloaded

        turns = [("budget-a", "budget-b"), ("budget-b", "budget-a"), ("budget-a", "budget-b")]
        for turn, (wanted, other) in enumerate(turns):
            assert _served(http)[wanted]["state"] == "UNLOADED"
            first = _predict(http, wanted)  # answered at once: the load runs meanwhile
            assert first.status_code == 503 and int(first.headers["Retry-After"]) >= 1
            assert f"model '{wanted}' is loading" in first.json()["detail"]
            loaded = wait_until(
                lambda wanted=wanted: _predict(http, wanted).status_code == 200,
                30,
                f"{wanted} loaded on demand",
            )
            assert loaded
            models = _served(http)
            assert models[wanted]["state"] == "READY" and models["digits"]["state"] == "READY"
            assert models[other]["state"] == "UNLOADED", models[other]
            if turn:  # from then on, the other one was loaded before
                assert "CONVSERVE_MODEL_MEMORY_MB" in models[other]["reason"]
        metrics = http.get("/metrics").text
        evicted = [
            line
            for line in metrics.splitlines()
            if line.startswith("convserve_model_evictions_total")
        ]
        assert evicted and float(evicted[0].split()[-1]) >= 2


def test_the_served_set_refuses_two_models_under_one_name(onnx_path, tmp_path):
    from convserve.service.catalog import Catalog, parse_models
    from convserve.service.metrics import Metrics
    from convserve.service.settings import Settings

    patterns, sources = parse_models(f" my-*, models:/shapes/3 ,{onnx_path},,")
    assert patterns == ["my-*"]
    assert [(s.name, s.version) for s in sources] == [("shapes", "3"), ("model", "file")]
    settings = Settings(model_uri=str(onnx_path), models="models:/model@champion")
    with pytest.raises(ValueError, match="the name 'model' is served already"):
        Catalog(settings, Metrics())


def test_a_model_unloaded_while_a_poll_finds_models_stays_unloaded(
    registry, onnx_path, tmp_path, monkeypatch
):
    """The repository's unload while a poll's discovery runs (the registry's listing read
    before the unload, applied during its awaits): the model stays out of the set, as the
    unload said, and is not found and loaded again."""
    import asyncio

    from convserve.service.catalog import Catalog
    from convserve.service.metrics import Metrics
    from convserve.service.settings import Settings

    client = MlflowClient(registry)
    if not client.search_registered_models("name = 'digits'"):  # run alone
        _register(client, "digits", onnx_path)
    _register(client, "race-a", onnx_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    settings = Settings(
        model_uri="models:/digits@champion", models="race-*", cache_dir=str(tmp_path)
    )

    async def scenario() -> None:
        catalog = Catalog(settings, Metrics())
        await catalog.start()
        deadline = asyncio.get_running_loop().time() + limit(30)
        while catalog.models["race-a"].engine is None:
            assert asyncio.get_running_loop().time() < deadline, "race-a loaded"
            await asyncio.sleep(0.05)
        listing = await catalog._listing()
        assert listing is not None and "race-a" in listing
        drop = catalog._drop

        async def drop_while_a_poll_discovers(name: str) -> None:
            await drop(name)
            await catalog._discover(listing)  # the poll, between the drop's awaits

        catalog._drop = drop_while_a_poll_discovers  # type: ignore[method-assign]
        try:
            await catalog.unload("race-a")
            assert "race-a" not in catalog.models and "race-a" in catalog.unloaded
            await catalog._discover(await catalog._listing())  # the next poll too
            assert "race-a" not in catalog.models
        finally:
            await catalog.close()

    asyncio.run(scenario())


def test_a_registry_that_cannot_be_listed_is_said_once_and_when_it_is_listed_again(
    registry, tmp_path, monkeypatch, caplog
):
    """A served set that follows the registry for new models, with the registry not
    answering: every poll's listing fails, the reason is kept for ``/v1/models``, and the log
    says it once, then once more when the registry answers again."""
    import asyncio
    import logging

    from convserve.service.catalog import Catalog
    from convserve.service.metrics import Metrics
    from convserve.service.registry import registry_for
    from convserve.service.settings import Settings

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    settings = Settings(model_uri="models:/digits@champion", models="*", poll_interval=7)
    catalog = Catalog(settings, Metrics())
    with caplog.at_level(logging.INFO, logger="convserve.service.catalog"):
        for _ in range(3):
            assert asyncio.run(catalog._listing()) is None
        error = catalog.discovery_error
        assert error is not None and error.startswith("cannot list the registry's models: ")
        catalog.default._client = registry_for(registry)  # the registry answers
        assert asyncio.run(catalog._listing()) is not None
    assert catalog.discovery_error is None
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if m.startswith("cannot list")] == [f"{error}; trying again every 7 s"]
    assert said[-1] == "the registry's models are listed again"
    catalog.executor.shutdown()


def _promote_cli(name: str, tracking_uri: str) -> subprocess.CompletedProcess[str]:
    """``convserve promote NAME`` against ``tracking_uri``."""
    cli = Path(sys.executable).parent / "convserve"
    return subprocess.run(
        [str(cli), "promote", name],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_live_promotion_with_the_registry_down_is_a_503_to_try_again(monkeypatch):
    """Not the 404 of a model without a challenger: the registry could not be read."""
    import asyncio

    from convserve.service.catalog import Catalog, NotServed
    from convserve.service.metrics import Metrics
    from convserve.service.rollout import Criteria
    from convserve.service.settings import Settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    settings = Settings(model_uri="models:/digits@champion", models="", poll_interval=2.5)
    catalog = Catalog(settings, Metrics())
    with pytest.raises(NotServed) as refused:
        asyncio.run(catalog.promote("digits", Criteria()))
    assert refused.value.status == 503 and refused.value.retry_after == 3
    assert refused.value.message.startswith("the registry cannot be read: ")
    catalog.executor.shutdown()


@pytest.fixture(scope="module")
def other_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second digits model, trained less: it disagrees with ``onnx_path`` on some digits."""
    from tests.service.conftest import _export

    folder = tmp_path_factory.mktemp("other-digits")
    return _export(folder, "optim.max_steps=6", "model.blocks=[{out_channels: 3}]")


def _digit_png(index: int) -> bytes:
    from sklearn.datasets import load_digits

    buf = io.BytesIO()
    pixels = (load_digits().images[index] * 255 / 16).astype("uint8")
    Image.fromarray(pixels, "L").save(buf, "PNG")
    return buf.getvalue()


def _top(answer: dict) -> str:  # type: ignore[type-arg]
    return str(answer["predictions"][0]["top_k"][0]["label"])


def test_a_challenger_is_shadowed_and_canaried_on_live_traffic_then_promoted_on_its_evidence(
    registry, onnx_path, other_digits, tmp_path
):
    from convserve.service import rollout
    from convserve.service.registry import registry_for

    client = MlflowClient(registry)
    name = "rollout-digits"
    champion = _register(client, name, onnx_path)
    challenger = _register(client, name, other_digits, champion=False)
    client.set_registered_model_alias(name, "challenger", challenger)
    run_id = client.get_model_version(name, challenger).run_id
    images = [_digit_png(i) for i in (3, 7, 12, 21)]
    settings = {
        "CONVSERVE_MODEL_URI": f"models:/{name}@champion",
        "CONVSERVE_MODELS": "",
        "CONVSERVE_WORKERS": "2",
        "CONVSERVE_ROLLOUT_LOG_SECONDS": "0.5",
    }
    with serve(registry, tmp_path, **settings) as http:

        def post(i: int) -> dict:  # type: ignore[type-arg]
            files = {"file": ("d.png", images[i % len(images)])}
            r = http.post("/predict", files=files)
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

        rollout_url = f"/v1/models/{name}/rollout"
        assert http.put(rollout_url, json={"shadow": 1.0}).status_code == 401
        r = http.put(rollout_url, json={"shadow": 0.7, "canary": 0.7}, headers=AUTH)
        assert r.status_code == 422
        r = http.put(rollout_url, json={"shadow": 1.0}, headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == challenger, r.text

        def both_ready() -> bool:
            states = [_served(http)[name]["rollout"].get("state") for _ in range(10)]
            return states == ["READY"] * 10

        wait_until(both_ready, 60, "the challenger loaded in both workers")
        # the shadow processes start as the challenger loads, before any request is shadowed
        wait_until(
            lambda: (
                {_served(http)[name]["rollout"].get("shadow_process") for _ in range(10)}
                == {"RUNNING"}
            ),
            30,
            "a running shadow process in both workers before the first request",
        )
        # shadow: every answer is the champion's; the challenger runs after it
        champion_tops = [_top(post(i)) for i in range(40)]
        answers = {i: post(i) for i in range(len(images))}
        assert {a["model"]["version"] for a in answers.values()} == {champion}
        # off in both workers before the canary, so that no request is shadowed meanwhile
        assert http.put(rollout_url, json={}, headers=AUTH).status_code == 200

        def both_off() -> bool:
            shares = [_served(http)[name].get("rollout") for _ in range(10)]
            return all(s is None or s["shadow"] == 0 for s in shares)

        wait_until(both_off, 30, "the shadow stopped in both workers")
        # canary: every answer is the challenger's, and says so
        assert http.put(rollout_url, json={"canary": 1.0}, headers=AUTH).status_code == 200
        wait_until(
            lambda: all(post(0)["model"]["alias"] == "challenger" for _ in range(10)),
            30,
            "the canary answers in both workers",
        )
        canaries = {i: post(i) for i in range(len(images))}
        assert {a["model"]["version"] for a in canaries.values()} == {challenger}
        agreeing = [champion_tops[i] == _top(canaries[i % len(images)]) for i in range(40)] + [
            _top(answers[i]) == _top(canaries[i]) for i in range(len(images))
        ]
        expected = sum(agreeing) / len(agreeing)
        assert 0 < expected < 1, "the two models should disagree on some digits"
        live = _served(http)[name]["rollout"]
        assert live["canary"] == 1.0 and "live" in live
        counts = {k: live["live"][k] for k in ("shadowed", "canary", "skipped", "failures")}
        assert all(type(v) is int for v in counts.values()), counts  # counts read as counts
        r = http.put(rollout_url, json={"shadow": 0.0, "canary": 0.0}, headers=AUTH)
        assert r.status_code == 200

        # every process logged its windows to the challenger's run: 44 images shadowed, or
        # skipped where the challenger's process (SCHED_IDLE) was starved of CPU by a busy
        # machine and that far behind, as the service is meant to do rather than queue them
        mlflow_registry = registry_for(registry)

        def logged() -> rollout.Evidence | None:
            seen = rollout.evidence(mlflow_registry, run_id)
            done = seen.requests + seen.skipped == 44 and seen.canary >= len(images)
            return seen if done else None

        seen = wait_until(logged, 30, "the live windows logged to MLflow")
        assert seen.requests > 0 and seen.failures == 0
        if not seen.skipped:  # which were skipped is not known: the agreement of all 44
            assert seen.agreement == pytest.approx(expected)
        assert seen.challenger_ms > 0 and seen.champion_ms > 0
        assert 0 < seen.challenger_confidence <= 1

        # promotion on that evidence: refused while it is short, then done and served
        promote = f"/admin/models/{name}/promote"
        assert http.post(promote).status_code == 401
        r = http.post(promote, params={"min_requests": 1000}, headers=AUTH)
        assert r.status_code == 200 and r.json()["promoted"] is False
        reason = f"{seen.requests} shadowed images, fewer than the 1000 asked"
        assert reason in r.json()["reason"]
        version = client.get_model_version(name, challenger)
        assert version.description.startswith("Challenger, not promoted on live traffic")
        asked = {"min_requests": seen.requests, "min_agreement": 0}
        r = http.post(promote, params=asked, headers=AUTH)
        decided = r.json()
        assert decided["promoted"] is True and decided["previous_champion"] == champion
        assert decided["evidence"]["requests"] == seen.requests
        assert client.get_model_version_by_alias(name, "champion").version == challenger
        version = client.get_model_version(name, challenger)
        assert version.description.startswith("Champion on live traffic: agreement")
        assert version.tags["convserve.previous_champion"] == champion
        wait_until(
            lambda: all(post(0)["model"]["version"] == challenger for _ in range(10)),
            30,
            "the promoted version served by both workers",
        )
    # the CLI says so when there is nothing to judge
    out = _promote_cli(name, registry)
    assert out.returncode == 2 and "has no challenger version" in out.stderr
    # and that it could not read the registry, when it could not: not "no challenger"
    down = f"http://127.0.0.1:{free_port()}"
    out = _promote_cli(name, down)
    assert out.returncode == 1, out.stderr
    assert f"the registry at {down}:" in out.stderr and "challenger" not in out.stderr
