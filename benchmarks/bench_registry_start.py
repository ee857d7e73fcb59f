"""Start to first answer of ``convserve serve`` following ``models:/NAME@champion`` on a real
MLflow tracking server, against the same model from a local file, in one run.

Starts ``mlflow server`` (SQLite, proxied artifacts), registers the default architecture's
export and gives it the ``champion`` alias; then, ``--repeats`` times each with an empty
model cache: ``convserve serve`` with the local file, and with the alias, posting until the
first 200. The download is timed on its own (one GET of the proxied ``model.onnx``). Target:
start to first answer with the alias at most 2 s plus the download.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Server, export_default, multipart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8775)
    args = parser.parse_args()
    import httpx
    import mlflow
    import onnx
    from mlflow.tracking import MlflowClient

    from convserve.pipelines.stack import MLFLOW_SERVER_ENV, mlflow_server_argv, wait_ready

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = export_default(folder)
        buf = io.BytesIO()
        Image.fromarray(np.full((28, 28), 128, dtype=np.uint8)).save(buf, "PNG")
        body = multipart(buf.getvalue())
        argv = mlflow_server_argv(
            f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts", "127.0.0.1", args.port + 1
        )
        url = f"http://127.0.0.1:{args.port + 1}"
        with open(folder / "mlflow.log", "wb") as log:
            mlflow_proc = subprocess.Popen(
                argv, env={**os.environ, **MLFLOW_SERVER_ENV}, stdout=log, stderr=log
            )
        try:
            wait_ready(f"{url}/health", mlflow_proc, 120)
            mlflow.set_tracking_uri(url)
            with mlflow.start_run():
                info = mlflow.onnx.log_model(
                    onnx.load(str(model)),
                    name="model",
                    registered_model_name="bench",
                    save_as_external_data=False,
                )
            client = MlflowClient(url)
            client.set_registered_model_alias("bench", "champion", info.registered_model_version)
            http = httpx.Client(base_url=url)
            uri = http.get(
                "/api/2.0/mlflow/model-versions/get-download-uri",
                params={"name": "bench", "version": info.registered_model_version},
            ).json()["artifact_uri"]
            path = uri.split(":", 1)[1].lstrip("/") + "/model.onnx"
            downloads = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                size = len(http.get(f"/api/2.0/mlflow-artifacts/artifacts/{path}").content)
                downloads.append(time.perf_counter() - start)
            results: dict[str, list[float]] = {"local file": [], "models:/bench@champion": []}
            for _ in range(args.repeats):
                for name, model_uri in (
                    ("local file", str(model)),
                    ("models:/bench@champion", "models:/bench@champion"),
                ):
                    cache = folder / "cache"
                    shutil.rmtree(cache, ignore_errors=True)
                    env = {
                        "CONVSERVE_MODEL_URI": model_uri,
                        "CONVSERVE_PORT": str(args.port),
                        "CONVSERVE_CACHE_DIR": str(cache),
                        "MLFLOW_TRACKING_URI": url,
                    }
                    label = "alias" if model_uri.startswith("models:/") else "file"
                    server = Server(label, [str(bin_dir / "convserve"), "serve"], env, args.port)
                    try:
                        server.start(body, folder)
                        server.measure_idle()
                    finally:
                        server.stop()
                    results[name].append(server.first_answer_s)
                    print(
                        f"{name:24s} first answer {server.first_answer_s:5.2f} s, "
                        f"RSS {server.rss_max_mb:4.0f} MB a process"
                    )
        finally:
            mlflow_proc.terminate()
            mlflow_proc.wait(timeout=30)
    local, alias = min(results["local file"]), min(results["models:/bench@champion"])
    download = min(downloads)
    print(f"\nbest of {args.repeats}: local file {local:.2f} s, alias {alias:.2f} s")
    print(f"download of model.onnx ({size / 1e6:.2f} MB) over the proxied store: {download:.3f} s")
    verdict = "met" if alias <= 2.0 + download else "not met"
    print(f"alias start {alias:.2f} s <= 2 s + download {download:.3f} s: {verdict}")


if __name__ == "__main__":
    main()
