"""Export a run to ONNX, check it, register it and promote it champion/challenger.

``models:/<name>@champion`` only ever names a version that passed every export check: a
version is created after the checks, and the alias moves only to such a version.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
import torch
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from convserve.contract import CHALLENGER, CHAMPION, write_alias
from convserve.training.checkpoint import load_model
from convserve.training.export import ExportCheckFailed, ParityReport, check_export, export_onnx
from convserve.training.model import ConvNet
from convserve.training.tracking import mlflow_client

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "convserve"
Direction = Literal["maximize", "minimize"]


@dataclass
class Decision:
    promoted: bool
    alias: str
    reason: str
    value: float | None
    champion_value: float | None
    previous_champion: str | None


@dataclass
class Published:
    onnx_path: Path
    parity: ParityReport
    run_id: str | None
    model_name: str | None = None
    version: str | None = None
    decision: Decision | None = None


def champion_version(client: MlflowClient, model_name: str) -> Any | None:
    """The version the ``champion`` alias names, or None (no such model or alias)."""
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _checkpoint_of(client: MlflowClient, run_id: str, folder: Path) -> Path:
    try:
        local = client.download_artifacts(run_id, "checkpoints/best.pt", str(folder))
    except MlflowException as err:
        raise FileNotFoundError(f"run {run_id} has no checkpoints/best.pt artifact: {err}") from err
    return Path(local)


def _signature(proto: Any) -> Any:
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(value_info: Any) -> TensorSpec:
        dims = [
            d.dim_value if d.dim_value > 0 else -1 for d in value_info.type.tensor_type.shape.dim
        ]
        return TensorSpec(np.dtype(np.float32), tuple(dims), value_info.name)

    return ModelSignature(
        Schema([spec(i) for i in proto.graph.input]), Schema([spec(o) for o in proto.graph.output])
    )


def pip_requirements() -> list[str]:
    """What the logged model needs, as MLflow's inference finds it (onnx, onnxruntime and
    numpy at this process's versions; MLflow adds itself), stated rather than inferred:
    inference imports the model in a second interpreter, about 2 s a registration."""
    import numpy as np

    return [*mlflow.onnx.get_default_pip_requirements(), f"numpy=={np.__version__}"]


def register(
    client: MlflowClient, onnx_path: Path, run_id: str, model_name: str, report: ParityReport
) -> str:
    """Log the ONNX model to the run and register it as a new version; returns the version."""
    import numpy as np
    import onnx

    proto = onnx.load(str(onnx_path))
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:]
    # Saved, logged and registered through ``client`` alone: MLflow's fluent ``start_run``
    # would end the run on the way out (a job's run is its worker's to end) and write
    # through an unguarded client.
    with tempfile.TemporaryDirectory(prefix="convserve-model-") as tmp:
        local = Path(tmp) / "model"
        mlflow.onnx.save_model(
            proto,
            str(local),
            signature=_signature(proto),
            input_example=np.zeros([1, *shape], dtype=np.float32),
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
            pip_requirements=pip_requirements(),
        )
        client.log_artifacts(run_id, str(local), "model")
    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = client.get_run(run_id)
    tags = {
        "convserve.dataset": run.data.tags.get("convserve.dataset", ""),
        "convserve.onnx_parity_max_abs_diff": f"{report.worst:.3g}",
        "convserve.config_hash": run.data.tags.get("convserve.config_hash", ""),
    }
    for key in ("best_val_accuracy", "val_accuracy", "val_loss", "test_accuracy"):
        if key in run.data.metrics:
            tags[f"metric.{key}"] = f"{run.data.metrics[key]:.6g}"
    # the tags with the version, in one request: no reader sees the version without them
    # (one by one, each tag took two requests: MLflow's client reads the model first)
    created = client.create_model_version(
        model_name, f"runs:/{run_id}/model", run_id=run_id, tags=tags
    )
    version = str(created.version)
    log.info("registered %s version %s from run %s", model_name, version, run_id)
    return version


def promote(
    client: MlflowClient,
    model_name: str,
    version: str,
    metric: str = "best_val_accuracy",
    direction: Direction = "maximize",
    margin: float = 0.0,
) -> Decision:
    """Champion/challenger: ``champion`` moves to ``version`` only if its run's ``metric``
    beats the current champion's on the same data set by at least ``margin``."""
    new = client.get_model_version(model_name, version)
    run_id = str(new.run_id)
    new_run = client.get_run(run_id)
    value = new_run.data.metrics.get(metric)
    dataset = new_run.data.tags.get("convserve.dataset")
    champion = champion_version(client, model_name)
    champion_value = None
    if value is None:
        decision = Decision(
            False,
            CHALLENGER,
            f"run has no metric {metric!r}",
            None,
            None,
            champion.version if champion else None,
        )
    elif champion is None:
        reason = f"no champion yet; {metric} {value:.4f}"
        decision = Decision(True, CHAMPION, reason, value, None, None)
    else:
        champ_run = client.get_run(str(champion.run_id))
        champion_value = champ_run.data.metrics.get(metric)
        champ_dataset = champ_run.data.tags.get("convserve.dataset")
        gain = (
            None
            if champion_value is None
            else (value - champion_value if direction == "maximize" else champion_value - value)
        )
        if gain is None:  # registered outside convserve, or never measured
            reason = (
                f"champion v{champion.version} has no recorded {metric}; a checked, "
                "measured version replaces it"
            )
            decision = Decision(True, CHAMPION, reason, value, None, champion.version)
        elif champ_dataset != dataset:
            reason = (
                f"champion v{champion.version} was trained on {champ_dataset}, this "
                f"version on {dataset}: not comparable"
            )
            decision = Decision(False, CHALLENGER, reason, value, champion_value, champion.version)
        elif gain > 0 and gain >= margin:
            reason = (
                f"{metric} {value:.4f} beats champion v{champion.version}'s "
                f"{champion_value:.4f} by at least {margin:g}"
            )
            decision = Decision(True, CHAMPION, reason, value, champion_value, champion.version)
        else:
            reason = (
                f"{metric} {value:.4f} does not beat champion v{champion.version}'s "
                f"{champion_value:.4f} by the margin {margin:g}"
            )
            decision = Decision(False, CHALLENGER, reason, value, champion_value, champion.version)
    # the decision recorded first: a server that follows the alias reads it with the version
    _record(client, model_name, version, run_id, metric, decision)
    set_alias(client, model_name, decision.alias, version)
    return decision


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """``alias`` to ``version``, tried again where it met another write of the alias (two
    workers promoting into one model at once: ``write_alias``)."""
    write_alias(lambda: client.set_registered_model_alias(name, alias, version), name, alias)


def _record(
    client: MlflowClient, name: str, version: str, run_id: str, metric: str, decision: Decision
) -> None:
    tags = {
        "convserve.promotion": decision.alias,
        "convserve.promotion_reason": decision.reason,
        "convserve.promotion_metric": metric,
        "convserve.previous_champion": decision.previous_champion or "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    # the decision in words where the registry's page shows it first
    verdict = "Champion" if decision.promoted else "Challenger, not promoted"
    client.update_model_version(name, version, description=f"{verdict}: {decision.reason}.")
    values = {
        "promotion.candidate_value": decision.value,
        "promotion.champion_value": decision.champion_value,
    }
    now = int(time.time() * 1000)
    client.log_batch(  # the run's copy in one request
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in values.items() if v is not None],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


def model_name_for(client: MlflowClient, run_id: str) -> str:
    """The registered model a run's export goes to when none is named: the uploaded data
    set's name for a run trained on one (anything but letters, digits, ``_``, ``.`` and ``-``
    as ``-``), else ``convserve``."""
    dataset = client.get_run(run_id).data.tags.get("convserve.dataset", "")
    if not dataset.startswith("dataset:"):  # an upload's: dataset:<name>@<id>
        return DEFAULT_MODEL_NAME
    name = dataset.removeprefix("dataset:").rpartition("@")[0]
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class Policy:
    """What happens to an export that passes its checks. ``model_name`` None: the run's own
    (``model_name_for``)."""

    model_name: str | None = None
    register: bool = True
    promote: bool = True
    metric: str = "best_val_accuracy"
    direction: Direction = "maximize"
    margin: float = 0.0


class PublishCancelled(RuntimeError):
    """``proceed`` said no (a cancelled job, or one whose worker lost its lease)."""


def _check(proceed: Callable[[], bool] | None, before: str) -> None:
    if proceed is not None and not proceed():
        raise PublishCancelled(f"cancelled before {before}")


def publish(
    *,
    run_id: str | None = None,
    checkpoint: Path | None = None,
    output: Path | None = None,
    tracking_uri: str | None = None,
    policy: Policy = Policy(),
    proceed: Callable[[], bool] | None = None,
    client: Any = None,
) -> Published:
    """Export a run's best checkpoint (or a checkpoint file) to ONNX, then ``publish_onnx``.

    The file goes to ``output``, else next to the run's checkpoints
    (``<tracking.output_dir>/<run-id>/model.onnx``). ``proceed`` is asked right before the
    export, the registration and the promotion; when it says no, ``PublishCancelled`` is
    raised and nothing stays published (a version registered meanwhile is deleted).
    """
    if (run_id is None) == (checkpoint is None):
        raise ValueError("give exactly one of run_id and checkpoint")
    client = client or mlflow_client(tracking_uri)
    _check(proceed, "the export")
    with tempfile.TemporaryDirectory(prefix="convserve-export-") as tmp:
        downloaded = checkpoint is None
        if checkpoint is None:
            assert run_id is not None
            checkpoint = _checkpoint_of(client, run_id, Path(tmp))
        model, config, spec, payload = load_model(checkpoint)
        run_id = run_id or payload.get("run_id")
        if output is None:  # next to the run's local checkpoints
            folder = (
                Path(config.tracking.output_dir) / str(run_id) if downloaded else checkpoint.parent
            )
            output = folder / "model.onnx"
        export_onnx(model, spec, config, run_id, output)
        sample = payload.get("sample")
        if sample is None:  # checkpoints written before samples travelled with them
            sample = torch.rand(8, spec.channels, *spec.image_size)
        return publish_onnx(client, output, model, sample, run_id, policy, proceed)


def publish_onnx(
    client: MlflowClient,
    onnx_path: Path,
    model: ConvNet,
    sample: torch.Tensor,
    run_id: str | None,
    policy: Policy,
    proceed: Callable[[], bool] | None = None,
) -> Published:
    """Check an ONNX file against its torch model, then register and promote it per policy.

    Raises ``ExportCheckFailed`` when a check fails: nothing is registered then, and the run
    is tagged ``convserve.export=refused: <reason>``.
    """
    try:
        report = check_export(model, onnx_path, sample)
    except ExportCheckFailed as err:
        if run_id:
            client.set_tag(run_id, "convserve.export", f"refused: {err}"[:5000])
        raise
    published = Published(onnx_path, report, run_id)
    if run_id:
        client.log_metric(run_id, "onnx_parity_max_abs_diff", report.worst)
        client.set_tag(run_id, "convserve.export", "passed")
    if policy.register:
        if not run_id:
            raise ValueError("registering needs an MLflow run: this checkpoint has none")
        name = published.model_name = policy.model_name or model_name_for(client, run_id)
        _check(proceed, "the registration")
        published.version = register(client, onnx_path, run_id, name, report)
        if proceed is not None and not proceed():  # cancelled while registering
            client.delete_model_version(name, published.version)
            raise PublishCancelled(
                f"cancelled while registering: version {published.version} deleted"
            )
        if policy.promote:
            published.decision = promote(
                client,
                name,
                published.version,
                policy.metric,
                policy.direction,
                policy.margin,
            )
    return published
