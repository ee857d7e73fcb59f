"""Real exported models for the service tests (trained here, exported with the product's
exporter), and a real uvicorn process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import free_port, wait_http


def _export(folder: Path, *overrides: str) -> Path:
    from convserve.training.checkpoint import load_model
    from convserve.training.export import export_onnx
    from convserve.training.run import train
    from tests.conftest import tiny_config

    result = train(tiny_config(folder, "optim.max_steps=40", *overrides))
    model, config, spec, _ = load_model(result.best_checkpoint)
    path = folder / "model.onnx"
    export_onnx(model, spec, config, result.run_id, path)
    return path


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits, two blocks: features.block1 [6, 8, 8], features.block2 [8, 4, 4]."""
    folder = tmp_path_factory.mktemp("model")
    return _export(folder, "model.blocks=[{out_channels: 6}, {out_channels: 8}]")


@pytest.fixture(scope="session")
def rgb_onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes (RGB 16x16, 9 classes), one block."""
    folder = tmp_path_factory.mktemp("rgb")
    return _export(folder, "data.name=shapes", "data.image_size=16", "data.shapes_samples=90")


@contextmanager
def uvicorn_server(env: dict[str, str], cwd: Path) -> Iterator[str]:
    """``convserve serve`` as a real process; yields its base URL."""
    port = free_port()
    full = {**os.environ, **env, "CONVSERVE_PORT": str(port), "CONVSERVE_HOST": "127.0.0.1"}
    log = open(cwd / f"serve-{port}.log", "wb")  # noqa: SIM115
    cli = str(Path(sys.executable).parent / "convserve")
    proc = subprocess.Popen(
        [cli, "serve"],
        env=full,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, timeout=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
