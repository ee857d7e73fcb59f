"""Hot reload under load: a real uvicorn process follows ``models:/NAME@champion`` on a real
MLflow server while concurrent clients keep predicting and the alias moves several times."""

import io
import time
import uuid

import httpx
import onnx
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.servers import (
    PredictLoad,
    follow_env,
    register_onnx,
    registered_model,
    uvicorn_server,
)
from tests.waiting import limit, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_alias_moves_under_load_without_a_failed_request(
    onnx_path, mlflow_url, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    client, name, versions = registered_model(mlflow_url, onnx_path, "reload", 3)
    broken = onnx.load(str(onnx_path))
    del broken.metadata_props[:]  # no convserve metadata: must be refused
    broken_version = register_onnx(client, name, broken)
    client.set_registered_model_alias(name, "champion", versions[0])

    # two workers: each follows the alias; the metrics add both up
    env = follow_env(mlflow_url, name, tmp_path / "cache", CONVSERVE_WORKERS="2")
    buf = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buf, "PNG")
    image = buf.getvalue()
    with uvicorn_server(env, tmp_path) as url:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "ready", 0.2)

        with PredictLoad(url, image, clients=6) as load:
            for moves, target in enumerate((versions[1], versions[2], versions[0], versions[2])):
                client.set_registered_model_alias(name, "champion", target)
                # both workers reloaded (the first load and one a move each, both counted),
                # before the alias moves again: the answers may all come from one of them
                reloads = f"convserve_model_reloads_total {2.0 * (moves + 2)}"
                wait_until(
                    lambda reloads=reloads: reloads in httpx.get(f"{url}/metrics").text,
                    30,
                    f"version {target} loaded by both workers",
                )
                wait_until(
                    lambda target=target: load.versions[-10:] == [target] * 10,
                    30,
                    f"version {target} served",
                )
            client.set_registered_model_alias(name, "champion", broken_version)
            wait_until(  # both workers polled and refused the broken version
                lambda: "convserve_model_refused_total 2.0" in httpx.get(f"{url}/metrics").text,
                30,
                "the broken version refused by both workers",
            )
            assert httpx.get(f"{url}/v1/model").json()["version"] == versions[2]
        seen, failures = load.versions, load.failures
        assert failures == []
        assert len(seen) > 50
        changes = [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
        assert set(seen) == set(versions)
        assert len(changes) >= 4  # every move showed up in the answers
        metrics = httpx.get(f"{url}/metrics").text
        assert "convserve_model_reloads_total 10.0" in metrics  # 5 in each worker
        assert "convserve_model_refused_total 2.0" in metrics
        r = httpx.post(f"{url}/admin/reload", headers={"Authorization": "Bearer tok"})
        assert "refused" in r.json()["message"]
        assert httpx.get(f"{url}/healthz").json()["model_version"] == versions[2]
    # every swap and the refusal are in the server's log, in words
    log = next(tmp_path.glob("serve-*.log")).read_text()
    assert f"serving {name} version {versions[1]} (was version {versions[0]})" in log
    assert f"version {broken_version} refused" in log


def test_an_artifact_store_hiccup_is_retried_not_refused(onnx_path, tmp_path, monkeypatch):
    """The store's artifacts vanish for a moment: the version is tried again with backoff
    and served once they are back, without /admin/reload; only a version that fails its
    checks is refused for good."""
    import asyncio

    from convserve.service.manager import ModelManager
    from convserve.service.metrics import Metrics
    from convserve.service.settings import Settings
    from tests.servers import mlflow_server

    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        client = MlflowClient(url)
        name = f"hiccup-{uuid.uuid4().hex[:6]}"
        version = register_onnx(client, name, onnx.load(str(onnx_path)))
        client.set_registered_model_alias(name, "champion", version)
        store = tmp_path / "server" / "artifacts"
        store.rename(tmp_path / "away")  # the artifact store is down

        async def scenario() -> None:
            settings = Settings(
                model_uri=f"models:/{name}@champion",
                cache_dir=str(tmp_path / "cache"),
                poll_interval=0.3,
            )
            manager = ModelManager(settings, Metrics())
            first = await manager.check()
            assert manager.model is None and "not loaded yet (try 1)" in first.message
            assert manager.refused == {} and version in manager.retrying
            assert "trying again" in manager.problems()[version]
            waiting = await manager.check()  # within the backoff: no new try
            assert "next try in" in waiting.message
            assert manager.retrying[version].attempts == 1
            assert not list((tmp_path / "cache").rglob("*.onnx"))  # nothing half-written
            (tmp_path / "away").rename(store)  # the store is back
            deadline = time.monotonic() + limit(10)  # past the retry's backoff, it is served
            while not (served := await manager.check()).changed:
                assert time.monotonic() < deadline, served.message
                await asyncio.sleep(0.05)
            assert served.changed and manager.model.source.version == version
            assert manager.problems() == {}
            await manager.close()

        asyncio.run(scenario())
