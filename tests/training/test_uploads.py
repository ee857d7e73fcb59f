"""Uploaded data sets (``training/uploads.py``): safe unpacking, the report, MLflow storage,
and training, exporting, serving and predicting on one, with real processes (a real MLflow
server, uvicorn, a worker)."""

import io
import os
import tarfile
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from convserve.training import uploads
from tests.servers import uvicorn_server, wait_for_job, wait_for_prediction, worker_process

TOKEN = "datasets-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _png(colour: tuple[int, int, int], seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype("uint8"), "RGB").save(buf, "PNG")
    return buf.getvalue()


def _archive(extra: dict[str, bytes] | None = None, per_class: int = 12) -> bytes:
    """Three colour classes under one enclosing folder, an empty class, a duplicate, a
    corrupt image and a text file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, colour in COLOURS.items():
            for i in range(per_class):
                z.writestr(f"colours/{name}/{i}.png", _png(colour, i))
        z.writestr("colours/red/copy.png", _png(COLOURS["red"], 0))
        z.writestr("colours/green/broken.png", b"\x89PNG\r\n\x1a\n but then nothing")
        z.writestr("colours/blue/notes.txt", b"three colours")
        z.writestr("colours/violet/", b"")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def test_unpacking_refuses_escapes_and_bombs_and_skips_links(tmp_path):
    bad = tmp_path / "bad.zip"
    for evil in ("../evil.png", "/etc/evil.png", "a/../../evil.png", "C:/evil.png"):
        bad.write_bytes(_archive({evil: b"x"}))
        with pytest.raises(uploads.DatasetError, match="outside the archive") as err:
            uploads.unpack(bad, tmp_path / "out")
        assert err.value.status == 422
    assert not (tmp_path / "evil.png").exists()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/zeros.png", b"\0" * 5_000_000)  # 5 MB in a few kB
    assert bomb.stat().st_size < 50_000
    with pytest.raises(uploads.DatasetError, match="expands beyond 1,000,000 bytes") as err:
        uploads.unpack(bomb, tmp_path / "bomb", uploads.Limits(expanded_bytes=1_000_000))
    assert err.value.status == 413
    linked = tmp_path / "links.tar.gz"
    with tarfile.open(linked, "w:gz") as tar:
        info = tarfile.TarInfo("a/passwd.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
        data = _png(COLOURS["red"], 1)
        info = tarfile.TarInfo("a/real.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    uploads.unpack(linked, tmp_path / "links")
    assert sorted(p.name for p in (tmp_path / "links" / "a").iterdir()) == ["real.png"]
    text = tmp_path / "notes.zip"
    text.write_bytes(b"not an archive at all")
    with pytest.raises(uploads.DatasetError, match="not a zip or tar archive"):
        uploads.unpack(text, tmp_path / "text")


def test_the_report_and_the_id(tmp_path):
    archive = tmp_path / "set.zip"
    archive.write_bytes(_archive())
    folder = tmp_path / "files"
    skipped = uploads.unpack(archive, folder)
    assert not (folder / "colours" / "blue" / "notes.txt").exists()  # never written
    report = uploads.build(folder, "colours", tmp_path / "a.tar", skipped=skipped)
    assert report.classes == {"blue": 12, "green": 12, "red": 12, "violet": 0}
    assert report.images == 36 and report.sizes == {"16x16": 36} and report.modes == {"RGB": 36}
    assert report.duplicates == [["red/0.png", "red/copy.png"]]
    assert {s["path"]: s["reason"].split(" (")[0] for s in report.skipped} == {
        "blue/notes.txt": "not an image",
        "green/broken.png": "cannot be decoded",
    }
    assert report.too_small == ["violet"]
    # the same images give the same id, whatever the archive looked like around them
    again = uploads.build(folder, "other-name", tmp_path / "b.tar")
    assert (
        again.id == report.id
        and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    )
    with pytest.raises(uploads.DatasetError, match="at least two class folders"):
        one = tmp_path / "one" / "only"
        one.mkdir(parents=True)
        (one / "x.png").write_bytes(_png(COLOURS["red"], 2))
        uploads.build(tmp_path / "one", "x", tmp_path / "c.tar")


def _env(mlflow_url: str, tmp: Path, model: str, cache: str) -> dict[str, str]:
    os.environ.pop("REDIS_URL", None)
    return {
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_API_TOKEN": TOKEN,
        "CONVSERVE_MODEL_URI": f"models:/{model}@champion",
        "CONVSERVE_POLL_INTERVAL": "0.5",
        "CONVSERVE_CACHE_DIR": str(tmp / "models"),
        "CONVSERVE_QUEUE_PATH": str(tmp / "queue.db"),
        "CONVSERVE_DATA_CACHE": str(tmp / cache),
        "CONVSERVE_MAX_DATASET_BYTES": "2000000",
    }


def _job(dataset_id: str, experiment: str, model: str | None) -> dict:
    job: dict = {
        "train": {
            "device": "cpu",
            "data": {"name": "dataset", "id": dataset_id, "batch_size": 8},
            "model": {"blocks": [{"out_channels": 4}], "hidden": []},
            "optim": {"epochs": 3, "lr": 0.01},
            "diagnostics": {"every": 5},
            "tracking": {"experiment": experiment},
        },
        "promote": True,
    }
    if model is not None:  # else the model named for the data set
        job["model_name"] = model
    return job


@pytest.mark.slow
def test_upload_train_serve_and_predict_on_an_uploaded_set(mlflow_url, tmp_path):
    model, experiment = f"ds-{uuid.uuid4().hex[:6]}", f"ds-{uuid.uuid4().hex[:6]}"
    colours = served = f"colours-{uuid.uuid4().hex[:4]}"  # and the model named for it
    # the default model (models:/ds-...@champion) does not exist yet; the API also serves the
    # model named for the upload, once a job registers it
    env = {**_env(mlflow_url, tmp_path, model, "cache-1"), "CONVSERVE_MODELS": served}
    body = _archive(per_class=13)  # not the browser test's 12: new images, a new id
    with uvicorn_server(env, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as http:
        zip_type = {"Content-Type": "application/zip"}
        assert (
            http.post("/datasets?name=colours", content=body, headers=zip_type).status_code == 401
        )
        before = len(http.get("/datasets").json()["datasets"])
        # refused archives store nothing and say why
        evil = _archive({"../evil.png": b"x"})
        r = http.post("/datasets?name=evil", content=evil, headers={**AUTH, **zip_type})
        assert r.status_code == 422 and "outside the archive" in r.json()["detail"]
        big = b"\0" * 2_100_000
        r = http.post("/datasets?name=big", content=big, headers={**AUTH, **zip_type})
        assert r.status_code == 413 and "CONVSERVE_MAX_DATASET_BYTES" in r.json()["detail"]
        assert len(http.get("/datasets").json()["datasets"]) == before
        # the upload and its report
        r = http.post(f"/datasets?name={colours}", content=body, headers={**AUTH, **zip_type})
        assert r.status_code == 201, r.text
        report = r.json()
        assert report["classes"] == {"blue": 13, "green": 13, "red": 13, "violet": 0}
        assert report["too_small"] == ["violet"] and len(report["skipped"]) == 2
        again = http.post(f"/datasets?name={colours}", content=body, headers={**AUTH, **zip_type})
        assert again.status_code == 200 and again.json()["id"] == report["id"]
        assert http.get(f"/datasets/{report['id']}").json()["name"] == colours
        assert http.get(f"/datasets/{colours}").json()["id"] == report["id"]  # by name
        # a job trains on it by id through the queue and registers into the model named for
        # the data set, whose champion it becomes; the running API serves it by that name,
        # and one of the set's own images (blue/3.png) is read as blue
        with worker_process(env, tmp_path):
            r = http.post("/jobs", json=_job(report["id"], experiment, None), headers=AUTH)
            assert r.status_code == 202, r.text
            job = wait_for_job(http, r.json()["id"], timeout=180)
        assert job["status"] == "succeeded", job
        assert job["registered_model"] == served and job["registered_version"] == "1"
        assert job["promoted"] is True and job["metrics"]["val_accuracy"] >= 0.8
        p = wait_for_prediction(http, _png(COLOURS["blue"], 3), model=served)
        assert p.json()["predictions"][0]["top_k"][0]["label"] == "blue"
        assert p.json()["model"]["run_id"] == job["id"]
        assert p.json()["model"]["name"] == served
        listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        assert listed[served]["dataset"] == f"dataset:{colours}@{report['id']}"
        reason, value = listed[served]["promotion"].rsplit(" ", 1)  # why, with its figure
        assert reason == "no champion yet; best_val_accuracy" and float(value) >= 0.8
        assert http.post("/predict", files={"file": ("x.png", b"")}).status_code == 503
        # the run shows the data set as its input, with its digest
        run = MlflowClient(mlflow_url).get_run(job["id"])
        digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
        assert report["id"] in digests
        assert run.data.tags["convserve.dataset"] == f"dataset:{colours}@{report['id']}"
        assert (tmp_path / "cache-1" / report["id"] / ".complete").exists()
        # a second worker with its own cache trains on the same data set by id
        other = {**env, "CONVSERVE_DATA_CACHE": str(tmp_path / "cache-2")}
        with worker_process(other, tmp_path, name="worker-2"):  # into the model it names
            r = http.post("/jobs", json=_job(report["id"], experiment, model), headers=AUTH)
            second = wait_for_job(http, r.json()["id"], timeout=180)
            assert second["status"] == "succeeded" and second["registered_model"] == model
        bare = wait_for_prediction(http, _png(COLOURS["red"], 3))  # the default model, now
        assert bare.json()["model"] == {**bare.json()["model"], "name": model, "version": "1"}
        assert sorted(p.name for p in (tmp_path / "cache-2" / report["id"]).iterdir()) == [
            ".complete",
            "blue",
            "green",
            "red",
        ]
        r = http.delete(f"/datasets/{report['id']}", headers=AUTH)
        assert r.status_code == 200 and http.get(f"/datasets/{report['id']}").status_code == 404
