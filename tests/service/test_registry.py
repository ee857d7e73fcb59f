"""The service's registry client against a real MLflow tracking server: REST for http(s),
the MLflow client for a SQLite file; the same answers either way."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from convserve.service.registry import (
    ClientRegistry,
    RegistryError,
    RestRegistry,
    not_found,
    registry_for,
)
from tests.servers import registered_model


@pytest.fixture
def registered(onnx_path, mlflow_url, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    client, name, (first, second) = registered_model(mlflow_url, onnx_path, "rest", 2)
    client.set_registered_model_alias(name, "champion", second)
    return client, name, first, second


def test_rest_and_client_give_the_same_answers(registered, onnx_path, tmp_path):
    client, name, first, second = registered
    rest = registry_for(client.tracking_uri)
    assert isinstance(rest, RestRegistry)
    via_client = ClientRegistry(client.tracking_uri)
    for registry in (rest, via_client):
        champion = registry.get_model_version_by_alias(name, "champion")
        assert champion.version == second
        assert champion.run_id == client.get_model_version(name, second).run_id
        assert registry.get_model_version(name, first).version == first
    folder = tmp_path / "rest"
    folder.mkdir()
    rest.download_onnx(name, second, folder)
    (got,) = folder.rglob("*.onnx")
    assert got.read_bytes() == onnx.load(str(onnx_path)).SerializeToString()
    assert [p.name for p in folder.rglob("*") if p.is_file()] == ["model.onnx"]  # only it


def test_rest_errors_say_what_mlflow_says(registered):
    client, name, _, _ = registered
    rest = RestRegistry(client.tracking_uri)
    with pytest.raises(RegistryError, match="RESOURCE_DOES_NOT_EXIST: Registered Model"):
        rest.get_model_version_by_alias("no-such-model", "champion")
    with pytest.raises(RegistryError, match="alias nope not found"):
        rest.get_model_version_by_alias(name, "nope")


def test_mlflow_credentials_travel_with_every_request(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0k3n")
    assert RestRegistry("https://mlflow.example").http.headers["Authorization"] == "Bearer t0k3n"
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    basic = RestRegistry("https://mlflow.example").http.auth
    assert basic is not None and basic._auth_header.startswith("Basic ")  # type: ignore[attr-defined]


def test_a_sqlite_tracking_uri_goes_through_the_mlflow_client(tmp_path):
    assert isinstance(registry_for(f"sqlite:///{tmp_path / 'm.db'}"), ClientRegistry)


def test_following_an_alias_over_http_does_not_import_the_mlflow_client(registered, tmp_path):
    """What keeps the serving process small and quick to start."""
    _, name, _, second = registered
    code = (
        "import sys; from pathlib import Path\n"
        "from convserve.service.model import download, parse_uri, resolve\n"
        "from convserve.service.registry import registry_for\n"
        f"r = registry_for(); s = resolve(parse_uri('models:/{name}@champion'), r)\n"
        f"s = download(s, r, Path(r'{tmp_path / 'cache'}'))\n"
        "print(s.version, s.path.exists(), 'mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == [second, "True", "False"], out.stderr


def test_a_version_registered_from_a_run_is_read_over_rest(onnx_path, mlflow_url, tmp_path):
    """``convserve export`` registers ``runs:/RUN_ID/model``, a source the registry's
    ``get-download-uri`` answers unresolved: the follower resolves it through the run and
    downloads only the ``.onnx``, without the MLflow client."""
    import uuid

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url)
    run_id = client.create_run(client.create_experiment(f"exp-{uuid.uuid4().hex[:6]}")).info.run_id
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_path.read_bytes())
    (folder / "MLmodel").write_text("flavors: {}\n")  # what else a model folder holds
    (folder / "input_example.json").write_text("{}")
    client.log_artifacts(run_id, str(folder), "model")
    name = f"runs-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version
    client.set_registered_model_alias(name, "champion", version)
    code = (
        "import sys; from pathlib import Path\n"
        "from convserve.service.model import download, parse_uri, resolve\n"
        "from convserve.service.registry import registry_for\n"
        f"r = registry_for('{mlflow_url}'); s = resolve(parse_uri('models:/{name}@champion'), r)\n"
        f"s = download(s, r, Path(r'{tmp_path / 'cache'}'))\n"
        f"print(s.version, s.path.read_bytes() == Path(r'{onnx_path}').read_bytes(), "
        "'mlflow' in sys.modules)\n"
        f"print(*sorted(p.name for p in Path(r'{tmp_path / 'cache'}').rglob('*') if p.is_file()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = out.stdout.splitlines()
    assert lines[0].split() == [str(version), "True", "False"], out.stderr
    assert lines[1].split() == ["model.onnx"], out.stdout


def test_a_missing_alias_or_model_is_told_apart_from_a_registry_that_cannot_be_read(
    registered,
):
    """``not_found``: through either registry, a missing alias (MLflow: INVALID_PARAMETER_VALUE,
    "... not found") and a missing model (RESOURCE_DOES_NOT_EXIST) are; a refused connection
    and a bad request are not."""
    from tests.servers import free_port

    client, name, first, _ = registered
    for registry in (RestRegistry(client.tracking_uri), ClientRegistry(client.tracking_uri)):
        for model, alias in ((name, "challenger"), ("no-such-model", "champion")):
            with pytest.raises(Exception) as missing:
                registry.get_model_version_by_alias(model, alias)
            assert not_found(missing.value), missing.value
        with pytest.raises(Exception) as bad:
            registry.set_alias(name, "champion", "not-a-version")
        assert not not_found(bad.value), bad.value
    with pytest.raises(Exception) as down:
        RestRegistry(f"http://127.0.0.1:{free_port()}").get_model_version(name, first)
    assert not not_found(down.value), down.value


def test_both_registries_list_every_models_aliases_page_by_page(registered, monkeypatch):
    """The one search a poll makes for every model's aliases reads every page, over REST and
    through the MLflow client alike (here two models a page)."""
    from convserve.service import registry as registry_module

    client, name, _, second = registered
    monkeypatch.setattr(registry_module, "MODELS_PAGE", 2)
    rest, via_client = RestRegistry(client.tracking_uri), ClientRegistry(client.tracking_uri)
    pages = {"rest": 0, "client": 0}
    rest_get, client_search = rest._get, via_client.client.search_registered_models

    def rest_page(path, **params):  # type: ignore[no-untyped-def]
        pages["rest"] += path == "registered-models/search"
        return rest_get(path, **params)

    def client_page(**kwargs):  # type: ignore[no-untyped-def]
        pages["client"] += 1
        return client_search(**kwargs)

    monkeypatch.setattr(rest, "_get", rest_page)
    monkeypatch.setattr(via_client.client, "search_registered_models", client_page)
    with_aliases = [m for m in client.search_registered_models(max_results=1000) if m.aliases]
    listed = rest.aliases()
    assert listed == via_client.aliases()
    assert listed[name] == {"champion": second}
    assert set(listed) == {m.name for m in with_aliases}
    total = len(client.search_registered_models(max_results=1000))
    assert pages["rest"] == pages["client"] >= max(2, -(-total // 2))
