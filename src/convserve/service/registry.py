"""The MLflow model registry as the service follows it: an alias's version, a version's run,
and the version's ``.onnx`` file.

With an ``http(s)`` tracking server this speaks MLflow's REST API itself (the registry calls,
``get-download-uri``, a ``runs:/`` source's run, and the proxied artifacts of ``mlflow server
--serve-artifacts``), so that the serving process does not import the MLflow client (over a
second of start-up and tens of megabytes that the predict path never uses). It honours MLflow's
own settings for such a server: ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (basic auth),
``MLFLOW_TRACKING_TOKEN`` (bearer), ``MLFLOW_TRACKING_INSECURE_TLS``,
``MLFLOW_TRACKING_SERVER_CERT_PATH``, ``MLFLOW_TRACKING_CLIENT_CERT_PATH`` and
``MLFLOW_HTTP_REQUEST_TIMEOUT``. Artifacts the server does not proxy (``s3://``, ``gs://``, ...)
and any other tracking URI (a SQLite file, Databricks) go through the MLflow client, imported
then.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlparse

from convserve.contract import write_alias

MODELS_PAGE = 1000  # registered models a search of every model's aliases reads a request (as
# MLflow's client asks); the listing goes on page by page


class RegistryError(RuntimeError):
    """The registry's answer to a request it refused: ``CODE: message``, as MLflow says it;
    ``error_code`` the code, as on MLflow's own exception (None for an answer without one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        code = message.partition(": ")[0]
        self.error_code = code if re.fullmatch(r"[A-Z_]+", code) else None


def not_found(err: Exception) -> bool:
    """Whether ``err`` is the registry's answer that the model, version or alias does not
    exist (through either registry), rather than a registry that could not be read."""
    code = getattr(err, "error_code", None)  # MlflowException's, RegistryError's
    # MLflow answers a missing alias INVALID_PARAMETER_VALUE, "... alias ... not found."
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(err)
    )


@dataclass(frozen=True)
class Version:
    version: str
    run_id: str
    # the version's tags (``metric.*``, ``convserve.dataset``, the promotion's reason)
    tags: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


class Registry(Protocol):
    tracking_uri: str

    def get_model_version_by_alias(self, name: str, alias: str) -> Version: ...

    def get_model_version(self, name: str, version: str) -> Version: ...

    def download_onnx(self, name: str, version: str, folder: Path) -> None:
        """The version's ``.onnx`` file(s) into ``folder``."""

    def aliases(self) -> dict[str, dict[str, str]]:
        """Every registered model with an alias: name -> alias -> the version it points to."""

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None: ...

    def metric_history(self, run_id: str, key: str) -> list[tuple[float, int]]:
        """Every value logged of ``key`` on the run, with its step."""

    def set_alias(self, name: str, alias: str, version: str) -> None: ...

    def delete_alias(self, name: str, alias: str) -> None: ...

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None: ...

    def describe_version(self, name: str, version: str, description: str) -> None: ...


def registry_for(tracking_uri: str | None = None) -> Registry:
    """REST for an ``http(s)`` tracking URI (``MLFLOW_TRACKING_URI`` by default), the MLflow
    client otherwise."""
    uri = _tracking_uri(tracking_uri)
    if over_rest(uri):
        return RestRegistry(uri)
    return ClientRegistry(uri or None)


def over_rest(tracking_uri: str | None = None) -> bool:
    """Whether ``registry_for`` reads this tracking URI (``MLFLOW_TRACKING_URI`` by default)
    over REST, with httpx."""
    return _tracking_uri(tracking_uri).startswith(("http://", "https://"))


def _tracking_uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


class RestRegistry:
    def __init__(self, tracking_uri: str) -> None:
        import httpx

        self.tracking_uri = tracking_uri.rstrip("/")
        env = os.environ.get
        headers, auth = {}, None
        if env("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {env('MLFLOW_TRACKING_TOKEN')}"
        elif env("MLFLOW_TRACKING_USERNAME") and env("MLFLOW_TRACKING_PASSWORD"):
            auth = (env("MLFLOW_TRACKING_USERNAME", ""), env("MLFLOW_TRACKING_PASSWORD", ""))
        verify: bool | str = True
        if env("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            verify = False
        elif env("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            verify = env("MLFLOW_TRACKING_SERVER_CERT_PATH", "")
        self.http = httpx.Client(
            base_url=self.tracking_uri,
            headers=headers,
            auth=auth,
            verify=verify,
            cert=env("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
            # MLflow's setting; 10 s by default here (MLflow's is 120): an answer of
            # /admin/reload or /readyz never waits minutes on a tracking server that hangs
            timeout=float(env("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")),
        )

    def _get(self, path: str, **params: str) -> Any:
        r = self.http.get(f"/api/2.0/mlflow/{path}", params=params)
        if r.status_code != 200:
            raise RegistryError(_error(r))
        return r.json()

    def get_model_version_by_alias(self, name: str, alias: str) -> Version:
        return _version(self._get("registered-models/alias", name=name, alias=alias))

    def get_model_version(self, name: str, version: str) -> Version:
        return _version(self._get("model-versions/get", name=name, version=version))

    def aliases(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        token = ""
        while True:
            params = {"max_results": str(MODELS_PAGE)} | ({"page_token": token} if token else {})
            page = self._get("registered-models/search", **params)
            for model in page.get("registered_models", []):
                entries = model.get("aliases", [])
                if entries:
                    found[model["name"]] = {e["alias"]: str(e["version"]) for e in entries}
            token = page.get("next_page_token", "")
            if not token:
                return found

    def _post(self, path: str, body: dict[str, Any], method: str = "POST") -> Any:
        r = self.http.request(method, f"/api/2.0/mlflow/{path}", json=body)
        if r.status_code != 200:
            raise RegistryError(_error(r))
        return r.json()

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        entries = [
            {"key": k, "value": v, "timestamp": now, "step": step} for k, v in metrics.items()
        ]
        self._post("runs/log-batch", {"run_id": run_id, "metrics": entries})

    def metric_history(self, run_id: str, key: str) -> list[tuple[float, int]]:
        found: list[tuple[float, int]] = []
        token = ""
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": "25000"}
            page = self._get(
                "metrics/get-history", **params, **({"page_token": token} if token else {})
            )
            found += [(float(m["value"]), int(m.get("step", 0))) for m in page.get("metrics", [])]
            token = page.get("next_page_token", "")
            if not token:
                return found

    def set_alias(self, name: str, alias: str, version: str) -> None:
        body = {"name": name, "alias": alias, "version": version}
        write_alias(lambda: self._post("registered-models/alias", body), name, alias)

    def delete_alias(self, name: str, alias: str) -> None:
        self._post("registered-models/alias", {"name": name, "alias": alias}, "DELETE")

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            body = {"name": name, "version": version, "key": key, "value": value}
            self._post("model-versions/set-tag", body)

    def describe_version(self, name: str, version: str, description: str) -> None:
        body = {"name": name, "version": version, "description": description}
        self._post("model-versions/update", body, "PATCH")

    def download_onnx(self, name: str, version: str, folder: Path) -> None:
        uri = self._get("model-versions/get-download-uri", name=name, version=version)
        artifact_uri = self._resolve(uri["artifact_uri"])
        parsed = urlparse(artifact_uri)
        if parsed.scheme == "mlflow-artifacts":  # proxied by the tracking server
            root = unquote(parsed.path).lstrip("/")
            for path in self._onnx_files(root):
                self._fetch(f"{root}/{path}", folder / path)
        elif parsed.scheme in ("", "file") and Path(unquote(parsed.path)).is_dir():
            # a store on this machine's disk (a server started without --serve-artifacts)
            for local in Path(unquote(parsed.path)).rglob("*.onnx"):
                shutil.copyfile(local, folder / local.name)
        else:  # s3://, gs://, ...: the MLflow client knows them
            import mlflow.artifacts

            mlflow.artifacts.download_artifacts(artifact_uri, dst_path=str(folder))

    def _resolve(self, artifact_uri: str) -> str:
        """A ``runs:/RUN_ID/PATH`` source (what ``convserve export`` and MLflow's
        ``create_model_version`` register) as the store's URI: the run's artifact root, then
        the path. The registry answers ``get-download-uri`` with such a source unresolved."""
        if not artifact_uri.startswith("runs:/"):
            return artifact_uri
        run_id, _, path = artifact_uri.removeprefix("runs:/").lstrip("/").partition("/")
        root = self._get("runs/get", run_id=run_id)["run"]["info"]["artifact_uri"]
        return f"{root.rstrip('/')}/{path}" if path else root

    def _onnx_files(self, root: str, below: str = "") -> list[str]:
        """The ``.onnx`` files under ``root`` in the proxied store, relative to it."""
        listing = self.http.get(
            "/api/2.0/mlflow-artifacts/artifacts", params={"path": f"{root}/{below}".rstrip("/")}
        )
        if listing.status_code != 200:
            raise RegistryError(_error(listing))
        found = []
        for entry in listing.json().get("files", []):
            path = f"{below}/{entry['path']}".lstrip("/") if below else entry["path"]
            if entry.get("is_dir"):
                found += self._onnx_files(root, path)
            elif path.endswith(".onnx"):
                found.append(path)
        return found

    def _fetch(self, path: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/api/2.0/mlflow-artifacts/artifacts/{quote(path)}") as r:
            if r.status_code != 200:
                r.read()
                raise RegistryError(_error(r))
            with open(target, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)


def _version(answer: dict[str, Any]) -> Version:
    mv = answer["model_version"]
    tags = {t["key"]: t.get("value", "") for t in mv.get("tags", [])}
    return Version(str(mv["version"]), mv.get("run_id", ""), tags)


def _error(response: Any) -> str:
    try:
        body = response.json()
        return f"{body['error_code']}: {body['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} from {response.request.url}: {response.text[:200]}"


class ClientRegistry:
    """The same, through the MLflow client (any tracking URI MLflow knows)."""

    def __init__(self, tracking_uri: str | None) -> None:
        from convserve.training.tracking import mlflow_client

        self.client = mlflow_client(tracking_uri)
        self.tracking_uri = str(self.client.tracking_uri)

    def get_model_version_by_alias(self, name: str, alias: str) -> Version:
        mv = self.client.get_model_version_by_alias(name, alias)
        return Version(str(mv.version), mv.run_id or "", dict(mv.tags or {}))

    def get_model_version(self, name: str, version: str) -> Version:
        mv = self.client.get_model_version(name, version)
        return Version(str(mv.version), mv.run_id or "", dict(mv.tags or {}))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=entries)

    def metric_history(self, run_id: str, key: str) -> list[tuple[float, int]]:
        return [(m.value, m.step) for m in self.client.get_metric_history(run_id, key)]

    def set_alias(self, name: str, alias: str, version: str) -> None:
        write_alias(
            lambda: self.client.set_registered_model_alias(name, alias, version), name, alias
        )

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(name, alias)

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    def describe_version(self, name: str, version: str, description: str) -> None:
        self.client.update_model_version(name, version, description=description)

    def aliases(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        token = None
        while True:
            page = self.client.search_registered_models(max_results=MODELS_PAGE, page_token=token)
            found |= {m.name: {a: str(v) for a, v in m.aliases.items()} for m in page if m.aliases}
            token = page.token
            if not token:
                return found

    def download_onnx(self, name: str, version: str, folder: Path) -> None:
        import mlflow.artifacts

        mlflow.artifacts.download_artifacts(
            f"models:/{name}/{version}", dst_path=str(folder), tracking_uri=self.tracking_uri
        )
