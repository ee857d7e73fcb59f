"""Real exported models for the service tests (trained here, exported with the product's
exporter), and a real uvicorn process."""

from __future__ import annotations

from pathlib import Path

import pytest


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
