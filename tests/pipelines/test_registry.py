"""Sweeps, selection, registration and promotion against real MLflow tracking servers: one on
SQLite and one whose backend store is this machine's PostgreSQL."""

import importlib.metadata
import uuid
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mlflow.tracking import MlflowClient

from convserve.jobs import JobSettings
from convserve.pipelines.registry import Policy, publish, publish_onnx
from convserve.pipelines.sweep import run_sweep
from convserve.training.checkpoint import load_model
from convserve.training.config import SweepConfig
from convserve.training.export import ExportCheckFailed
from convserve.training.run import train
from tests.conftest import tiny_config
from tests.servers import mlflow_server

pytestmark = pytest.mark.slow


def _walk(url: str, tmp_path: Path) -> None:
    name = f"convserve-{uuid.uuid4().hex[:8]}"
    experiment = f"exp-{uuid.uuid4().hex[:8]}"
    overrides = [
        "tracking.enabled=true",
        f"tracking.tracking_uri={url}",
        f"tracking.experiment={experiment}",
        "optim.epochs=2",
    ]
    base = tiny_config(tmp_path, *overrides)
    sweep = SweepConfig(
        name="tiny",
        base=base,
        grid={
            "init": [{"name": "he_normal"}, {"name": "normal", "std": 0.01}],
            "model.activation": ["relu", "sigmoid"],
        },
    )
    policy = Policy(model_name=name)
    result = run_sweep(
        sweep, policy=policy, settings=JobSettings(queue_path=str(tmp_path / "q.db"))
    )
    client = MlflowClient(url)

    # every child is nested under the parent; the summary is on the parent
    assert len(result.rows) == 4 and all(r.status == "finished" for r in result.rows)
    children = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 4
    summary = {a.path for a in client.list_artifacts(result.parent_run_id, "summary")}
    assert {"summary/sweep.csv", "summary/sweep.md", "summary/heatmap.png"} <= summary

    # the champion is the best child, which passed the export checks
    best_value = max(r.value for r in result.rows)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == result.best_run_id
    champ_run = client.get_run(champion.run_id)
    assert champ_run.data.metrics["best_val_accuracy"] == pytest.approx(best_value)
    assert float(champ_run.data.metrics["onnx_parity_max_abs_diff"]) < 1e-4
    assert champion.tags["convserve.promotion"] == "champion"
    assert champion.tags["convserve.dataset"] == "digits"
    assert champion.description == f"Champion: {champion.tags['convserve.promotion_reason']}."

    # a deliberately worse run does not take the alias
    worse = train(tiny_config(tmp_path, *overrides, "init.name=constant", "optim.max_steps=3"))
    published = publish(
        run_id=worse.run_id, tracking_uri=url, output=tmp_path / "w.onnx", policy=policy
    )
    assert published.decision is not None and not published.decision.promoted
    assert published.decision.alias == "challenger"
    assert client.get_model_version_by_alias(name, "champion").version == champion.version
    assert client.get_model_version_by_alias(name, "challenger").version == published.version
    assert "does not beat" in client.get_run(worse.run_id).data.tags["convserve.promotion_reason"]
    described = client.get_model_version(name, published.version).description
    assert described.startswith("Challenger, not promoted: best_val_accuracy ")
    assert f"does not beat champion v{champion.version}'s" in described

    # models:/NAME@champion downloads an ONNX file that onnxruntime runs like torch (MLflow
    # resolves models:/ through the process's registry URI, whatever the call says)
    mlflow.set_tracking_uri(url)
    folder = mlflow.artifacts.download_artifacts(
        f"models:/{name}@champion",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=url,
        registry_uri=url,
    )
    session = ort.InferenceSession(
        str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    # what the model needs, pinned to the versions that exported it (stated, not inferred)
    required = (Path(folder) / "requirements.txt").read_text().split()
    for package in ("mlflow", "numpy", "onnx", "onnxruntime"):
        assert f"{package}=={importlib.metadata.version(package)}" in required, required
    ckpt = client.download_artifacts(champion.run_id, "checkpoints/best.pt", str(tmp_path))
    model, _, _, payload = load_model(ckpt)
    x = payload["sample"]
    probs, feats = session.run(["probabilities", "features.block1"], {"image": x.numpy()})
    with torch.no_grad():
        logits, expected = model.forward_features(x)
    assert np.abs(probs - torch.softmax(logits, 1).numpy()).max() < 1e-4
    assert np.abs(feats - expected["block1"].numpy()).max() < 1e-4

    # an export whose graph differs from torch is refused and never registered
    versions = len(client.search_model_versions(f"name = '{name}'"))
    proto = onnx.load(str(Path(folder) / "model.onnx"))
    init = proto.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy() + 0.25
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    with pytest.raises(ExportCheckFailed):
        publish_onnx(client, tampered, model, x, champion.run_id, policy)
    assert len(client.search_model_versions(f"name = '{name}'")) == versions
    assert client.get_model_version_by_alias(name, "champion").version == champion.version
    assert client.get_run(champion.run_id).data.tags["convserve.export"].startswith("refused")


def test_sweep_register_promote_on_a_sqlite_server(mlflow_url, tmp_path):
    _walk(mlflow_url, tmp_path)


def test_sweep_register_promote_on_a_postgresql_server(tmp_path):
    psycopg2 = pytest.importorskip("psycopg2")
    db = f"convserve_test_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {db}")
    try:
        backend = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
        with mlflow_server(tmp_path / "server", backend) as url:
            _walk(url, tmp_path)
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.close()


@pytest.mark.parametrize("answers", [[False], [True, False], [True, True, False]])
def test_a_publication_asked_to_stop_leaves_nothing_published(sqlite_uri, tmp_path, answers):
    """``proceed`` is asked before the export, the registration and the promotion: saying
    no at any of them leaves no version and no alias (one registered meanwhile is deleted)."""
    from convserve.pipelines.registry import PublishCancelled

    run = train(
        tiny_config(
            tmp_path,
            "tracking.enabled=true",
            f"tracking.tracking_uri={sqlite_uri}",
            "optim.max_steps=5",
        )
    )
    name = f"stop-{uuid.uuid4().hex[:6]}"
    asked = iter(answers)
    with pytest.raises(PublishCancelled):
        publish(
            run_id=run.run_id,
            tracking_uri=sqlite_uri,
            policy=Policy(model_name=name),
            proceed=lambda: next(asked),
        )
    client = MlflowClient(sqlite_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    assert versions == [] or all(v.current_stage == "Deleted" for v in versions)
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, "champion")


def test_a_run_on_an_uploaded_set_registers_into_a_model_named_for_it(sqlite_uri):
    from mlflow.tracking import MlflowClient

    from convserve.pipelines.registry import model_name_for

    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("names")
    expected = {
        "dataset:my_flowers.v2@3f2a": "my_flowers.v2",
        "dataset:été-photos@9c1d": "été-photos",
        "dataset:a b@c@9c1d": "a-b-c",  # only the last @ starts the id
        "digits": "convserve",
        "": "convserve",
    }
    for tag, name in expected.items():
        run = client.create_run(experiment, tags={"convserve.dataset": tag} if tag else {})
        assert model_name_for(client, run.info.run_id) == name, tag


@pytest.mark.parametrize("writer", ["training", "service REST", "service client"])
def test_promotions_into_one_model_at_once_all_set_their_alias(mlflow_url, writer):
    """MLflow's store reads an alias, then inserts or updates it: writes of one alias at once
    collide (a unique constraint, 400). Each of four writers at once, over rounds that start
    with no alias, sets it: none fails, and the alias names one of theirs. The writers: a
    job's promotion (``pipelines.registry``), and the service's live promotion through either
    of its registries (REST, the MLflow client)."""
    import threading

    from convserve.pipelines.registry import set_alias as training_alias
    from convserve.service.registry import ClientRegistry, RestRegistry

    def set_alias(name: str, alias: str, version: str) -> None:
        if writer == "training":
            training_alias(MlflowClient(mlflow_url), name, alias, version)
        elif writer == "service REST":
            RestRegistry(mlflow_url).set_alias(name, alias, version)
        else:
            ClientRegistry(mlflow_url).set_alias(name, alias, version)

    client = MlflowClient(mlflow_url)
    name = f"race-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    versions = [
        str(client.create_model_version(name, f"s3://bucket/v{i}").version) for i in range(4)
    ]
    failures: list[Exception] = []
    for _ in range(10):
        client.delete_registered_model_alias(name, "champion")
        start = threading.Barrier(len(versions))

        def write(version: str, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                set_alias(name, "champion", version)
            except Exception as err:  # every failure is the finding
                failures.append(err)

        writers = [threading.Thread(target=write, args=(v,)) for v in versions]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        assert client.get_model_version_by_alias(name, "champion").version in versions
    assert failures == []
