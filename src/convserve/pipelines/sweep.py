"""Grid sweeps: one MLflow parent run, a nested child run per grid point, a summary, and the
best child exported, registered and promoted."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convserve.pipelines.registry import Policy, Published, publish, select_best
from convserve.training.config import SweepConfig, TrainConfig
from convserve.training.plots import save_figure, subplots
from convserve.training.run import Callbacks, TrainResult, train
from convserve.training.tracking import Tracker, get_or_create_experiment

log = logging.getLogger(__name__)


@dataclass
class Row:
    point: dict[str, Any]
    status: str  # finished, diverged, cancelled, failed
    value: float | None
    diagnosis: str  # the run's diagnosis (its cause), "" when it failed
    run_id: str | None
    error: str = ""


@dataclass
class SweepResult:
    parent_run_id: str | None
    rows: list[Row]
    best_run_id: str | None
    published: Published | None = None
    folder: Path | None = None
    summary: list[str] = field(default_factory=list)


def label(value: Any) -> str:
    """A short label for a grid value: ``normal(std=0.01)`` for a section."""
    if isinstance(value, dict):
        rest = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value.get('name', '')}({rest})" if rest else str(value.get("name", value))
    return str(value)


# Grid fields that the config's short name already shows.
_IN_SHORT_NAME = {"model", "model.activation", "model.blocks", "model.hidden", "init", "init.name"}


def child_name(cfg: TrainConfig, point: dict[str, Any]) -> str:
    """The config's short name, plus the grid values it does not show:
    ``relu-he_normal-16x32 lr=0.01``."""
    extra = [f"{k.split('.')[-1]}={label(v)}" for k, v in point.items() if k not in _IN_SHORT_NAME]
    if "init" in point and isinstance(point["init"], dict) and len(point["init"]) > 1:
        extra.insert(0, label(point["init"]))  # e.g. normal(std=0.01)
    return " ".join([cfg.short_name(), *extra])


def run_sweep(
    sweep: SweepConfig,
    *,
    policy: Policy | None = None,
    on_child: Callable[[int, int, dict[str, Any]], Callable[..., Any] | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    parent_run_id: str | None = None,
    proceed: Callable[[], bool] | None = None,
    client: Any = None,
) -> SweepResult:
    """Train every grid point; a failed or diverged child is recorded and the sweep goes on.

    With a ``policy`` the best finished child is exported, checked, registered and promoted.
    ``on_child(index, total, point)`` may return a per-step callback for progress.
    ``parent_run_id`` continues an existing run as the parent (a sweep job); ``client`` is the
    MLflow client every run writes through, and ``proceed`` is asked before publishing (both
    from a job's lease).
    """
    parent = _start_parent(sweep, parent_run_id, client)
    folder = Path(sweep.base.tracking.output_dir) / (parent.run_id or "sweep")
    try:
        rows = _train_children(sweep, parent.run_id, on_child, should_stop, client)
    except BaseException:
        parent.end("KILLED")
        raise
    result = SweepResult(parent.run_id, rows, None, folder=folder)
    result.summary = write_summary(sweep, rows, folder)
    parent.log_artifacts(folder, "summary")
    finished = [r for r in rows if r.status == "finished" and r.value is not None]
    if parent.run_id is not None and finished:
        _select_and_publish(sweep, parent, policy, result, proceed)
    parent.end("FINISHED" if finished or not rows else "FAILED")
    return result


def _start_parent(sweep: SweepConfig, parent_run_id: str | None, client: Any) -> Tracker:
    """The parent run (new, or the job's own run), tagged with the grid and the metric."""
    base = sweep.base
    parent_cfg = base.model_copy(
        update={"tracking": base.tracking.model_copy(update={"run_name": sweep.parent_name()})}
    )
    # A job's own run is ended by its worker, after publishing.
    parent = Tracker(parent_cfg.tracking, client, end_run=parent_run_id is None)
    parent_id = parent.start(
        parent_cfg, parent_run_id, tags={"convserve.kind": "sweep"} if parent_run_id is None else {}
    )
    if parent_id is not None:
        parent.set_tags(
            {
                "convserve.grid": json.dumps(sweep.grid)[:5000],
                "convserve.metric": f"{sweep.direction} {sweep.metric}",
            }
        )
    return parent


def _train_children(
    sweep: SweepConfig,
    parent_id: str | None,
    on_child: Callable[[int, int, dict[str, Any]], Callable[..., Any] | None] | None,
    should_stop: Callable[[], bool] | None,
    client: Any = None,
) -> list[Row]:
    combos = sweep.combinations()
    done = _finished_children(sweep, parent_id, client)
    rows: list[Row] = []
    for index, (point, cfg) in enumerate(combos):
        if should_stop is not None and should_stop():
            break
        if _point_key(point) in done:  # trained by an earlier attempt of this sweep job
            rows.append(done[_point_key(point)])
            continue
        step_cb = on_child(index, len(combos), point) if on_child else None
        callbacks = Callbacks(on_step=step_cb, should_stop=should_stop)
        rows.append(_child(cfg, point, parent_id, sweep.metric, callbacks, client))
    return rows


def _point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)[:5000]


def _finished_children(sweep: SweepConfig, parent_id: str | None, client: Any) -> dict[str, Row]:
    """Grid points an earlier attempt of the same parent run already finished (a sweep job
    run again after its worker was lost), by point."""
    if parent_id is None or client is None:
        return {}
    experiment = get_or_create_experiment(client, sweep.base.tracking.experiment)
    runs = client.search_runs(
        [experiment],
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    done = {}
    for run in runs:
        key = run.data.tags.get("convserve.point")
        if key is not None:
            diagnosis = run.data.tags.get("convserve.diagnosis", "")
            value = run.data.metrics.get(sweep.metric)
            point = json.loads(key)
            done[key] = Row(point, "finished", value, diagnosis, run.info.run_id)
    return done


def _select_and_publish(
    sweep: SweepConfig,
    parent: Tracker,
    policy: Policy | None,
    result: SweepResult,
    proceed: Callable[[], bool] | None = None,
) -> None:
    """Record the best child on the parent; with a ``policy``, publish it."""
    client = parent.client
    experiment = get_or_create_experiment(client, sweep.base.tracking.experiment)
    best = select_best(
        client,
        [experiment],
        sweep.metric,
        sweep.direction,
        f"tags.mlflow.parentRunId = '{parent.run_id}'",
    )
    if best is None:
        return
    result.best_run_id = best.info.run_id
    parent.log_metrics({f"best_{sweep.metric}": best.data.metrics[sweep.metric]}, 0)
    parent.set_tags({"convserve.best_run_id": best.info.run_id})
    if policy is not None:
        result.published = publish(
            run_id=best.info.run_id, policy=policy, proceed=proceed, client=client
        )


def _child(
    cfg: TrainConfig,
    point: dict[str, Any],
    parent_id: str | None,
    metric: str,
    callbacks: Callbacks,
    client: Any = None,
) -> Row:
    name = child_name(cfg, point)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": name})})
    tags = {"convserve.point": _point_key(point)}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    try:
        outcome: TrainResult = train(cfg, tags=tags, callbacks=callbacks, client=client)
    except Exception as err:  # a child's failure is recorded; the sweep goes on
        log.warning("sweep point %s failed: %s", name, err)
        return Row(point, "failed", None, "", None, f"{type(err).__name__}: {err}")
    value = outcome.metrics.get(metric)
    return Row(
        point,
        outcome.status,
        value if outcome.status == "finished" else None,
        outcome.diagnosis.verdict,
        outcome.run_id,
        outcome.message,
    )


def write_summary(sweep: SweepConfig, rows: list[Row], folder: Path) -> list[str]:
    """``sweep.csv``, ``sweep.md`` and ``heatmap.png`` (1- or 2-field grids) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sweep.grid)
    header = [*keys, "status", sweep.metric, "diagnosis", "run_id", "note"]
    table = [
        [
            *(label(r.point[k]) for k in keys),
            r.status,
            "" if r.value is None else f"{r.value:.4f}",
            r.diagnosis,
            r.run_id or "",
            r.error.replace("\n", " ")[:200],
        ]
        for r in rows
    ]
    with open(folder / "sweep.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    lines = [
        f"# Sweep {sweep.name or ''}".rstrip(),
        "",
        f"{sweep.direction} `{sweep.metric}` over {len(rows)} runs.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table]
    (folder / "sweep.md").write_text("\n".join(lines) + "\n")
    if 1 <= len(keys) <= 2:
        _heatmap(sweep, rows, folder / "heatmap.png")
    return lines


def _heatmap(sweep: SweepConfig, rows: list[Row], path: Path) -> None:
    import numpy as np

    keys = list(sweep.grid)
    ys = [label(v) for v in sweep.grid[keys[0]]]
    xs = [label(v) for v in sweep.grid[keys[1]]] if len(keys) == 2 else [sweep.metric]
    grid = np.full((len(ys), len(xs)), np.nan)
    notes = np.full((len(ys), len(xs)), "", dtype=object)
    for r in rows:
        i = ys.index(label(r.point[keys[0]]))
        j = xs.index(label(r.point[keys[1]])) if len(keys) == 2 else 0
        grid[i, j] = math.nan if r.value is None else r.value
        notes[i, j] = (
            (f"{r.value:.3f}" if r.value is not None else r.status)
            + "\n"
            + ("" if r.diagnosis == "healthy" else r.diagnosis)
        )
    fig, ax = subplots(figsize=(1.6 + 1.9 * len(xs), 1.0 + 0.8 * len(ys)))
    ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            ax.text(j, i, notes[i, j], ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(ys)), ys, fontsize=8)
    ax.set(
        xlabel=keys[1] if len(keys) == 2 else "",
        ylabel=keys[0],
        title=f"{sweep.metric} ({sweep.direction})",
    )
    save_figure(fig, path)
