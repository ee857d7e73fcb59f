"""Checkpoints hold the model, the optimizer, the epoch, the best metric and the resolved config
(nanoGPT ``train.py``), plus what is needed to rebuild the model without the data set, and
what an exact resume needs: the position within the epoch (its batches done and its tally),
every random generator's state, the loss scaler's, the history and the diagnostics'
snapshots, and whether the run had finished."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convserve.training.config import TrainConfig
from convserve.training.model import ConvNet, build_model

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that defines a trained model."""

    classes: list[str]
    channels: int
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    dataset: str


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    config: TrainConfig,
    spec: ModelSpec,
    epoch: int,
    step: int,
    best_metric: float,
    metrics: dict[str, float],
    run_id: str | None,
    sample: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
    weights: dict[str, Any] | None = None,
) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind.
    ``weights``: other than ``model``'s (a best epoch's, kept aside).
    ``extra``: what a resume needs beyond the weights (a training run's position in its
    epoch, the random generators' states, the loss scaler, the history and snapshots)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": weights if weights is not None else model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": config.model_dump(mode="json"),
        "spec": {**spec.__dict__, "image_size": list(spec.image_size)},
        "epoch": epoch,
        "step": step,
        "best_metric": best_metric,
        "metrics": metrics,
        "run_id": run_id,
        "sample": sample,  # validation images in [0, 1], for export checks
        **(extra or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a convserve checkpoint (format {FORMAT_VERSION})")
    return payload


def spec_of(payload: dict[str, Any]) -> ModelSpec:
    s = payload["spec"]
    return ModelSpec(
        s["classes"], s["channels"], tuple(s["image_size"]), s["mean"], s["std"], s["dataset"]
    )


def load_model(path: str | Path) -> tuple[ConvNet, TrainConfig, ModelSpec, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode: (model, config, spec, payload)."""
    payload = read_checkpoint(path)
    config = TrainConfig.model_validate(payload["config"])
    spec = spec_of(payload)
    model = build_model(
        config.model, spec.channels, spec.image_size, len(spec.classes), spec.mean, spec.std
    )
    model.load_state_dict(payload["model"])
    model.eval()
    return model, config, spec, payload


def torch_rng_state() -> dict[str, Any]:
    """The generators a training step draws from (dropout, augmentation): torch's on the
    CPU and on each GPU; cheap enough to take before every step (about 1 us)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state(torch_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every random generator of the process (Python's, NumPy's, torch's), to be put back
    with ``set_rng_state``; ``torch_state``: torch's, taken earlier (before a step)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        **(torch_state or torch_rng_state()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
