"""Sweeps: one MLflow parent run, an Optuna study whose trials are its nested child runs, a
summary that grows as trials end, and the best trial exported, registered and promoted once.

``run_sweep`` trains a study's trials one after another in this process (``convserve
sweep``); ``run_trial`` trains one, and is what a worker runs for each trial task on the queue
(``worker.py``). The study itself is in ``study.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from convserve.jobs import JobSettings, Tag, worker_id
from convserve.pipelines import study as studies
from convserve.pipelines.heartbeat import draining
from convserve.pipelines.lease import GuardedClient, Lease
from convserve.pipelines.registry import Policy, Published, publish
from convserve.pipelines.runs import last_checkpoint
from convserve.pipelines.study import TrialRow
from convserve.redact import redact
from convserve.training.config import Range, SweepConfig, TrainConfig
from convserve.training.plots import save_figure, subplots
from convserve.training.run import Callbacks, TrainResult, train
from convserve.training.tracking import Tracker, get_or_create_experiment, log_params, run_tags

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    parent_run_id: str | None
    rows: list[TrialRow]
    best_run_id: str | None
    published: Published | None = None
    folder: Path | None = None
    summary: list[str] = field(default_factory=list)


def label(value: Any) -> str:
    """A short label for a grid value: ``normal(std=0.01)`` for a section."""
    if isinstance(value, dict):
        rest = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value.get('name', '')}({rest})" if rest else str(value.get("name", value))
    if isinstance(value, float) and len(str(value)) > 8:  # a drawn value: 0.0031622776...
        return f"{value:.4g}"
    return str(value)


# Grid fields that the config's short name already shows.
_IN_SHORT_NAME = {
    *("data.name", "data.id"),
    *("model", "model.activation", "model.blocks", "model.hidden", "init", "init.name"),
}


def child_name(cfg: TrainConfig, point: dict[str, Any]) -> str:
    """The config's short name, plus the grid values it does not show:
    ``digits-relu-he_normal-16x32 lr=0.01``."""
    extra = [f"{k.split('.')[-1]}={label(v)}" for k, v in point.items() if k not in _IN_SHORT_NAME]
    if "init" in point and isinstance(point["init"], dict) and len(point["init"]) > 1:
        extra.insert(0, label(point["init"]))  # e.g. normal(std=0.01)
    return " ".join([cfg.short_name(), *extra])


def run_sweep(
    sweep: SweepConfig,
    *,
    policy: Policy | None = None,
    on_trial: Callable[[int, int, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    settings: JobSettings | None = None,
) -> SweepResult:
    """Train the study's trials one after another in this process; a failed, diverged or
    pruned trial is recorded and the sweep goes on. With a ``policy`` the best finished trial
    is exported, checked, registered and promoted. ``on_trial(number, total, point)`` is
    called as each trial starts."""
    settings = settings or JobSettings()
    parent = start_parent(sweep)
    parent_id = parent.run_id or uuid.uuid4().hex  # untracked: the study still needs a name
    storage = studies.open_storage(settings)
    try:
        study = studies.ensure(sweep, parent_id, storage)
        worker = worker_id()
        while not (should_stop is not None and should_stop()):
            trial = run_trial(
                sweep,
                parent_id if parent.run_id else None,
                study,
                storage,
                parent.client if parent.enabled else None,
                worker=worker,
                settings=settings,
                on_start=on_trial,
                parent_cancelled=should_stop,
            )
            if trial is None:
                break
            if parent.run_id:
                record_progress(parent.client, parent.run_id, sweep, study)
        if should_stop is not None and should_stop():
            studies.fail_waiting(study, studies.CANCELLED)
    except BaseException:
        parent.end("KILLED")
        raise
    result = finish(sweep, parent_id, study, parent.client if parent.run_id else None, policy)
    parent.end("FINISHED" if result.best_run_id else "FAILED")
    return result


def start_parent(sweep: SweepConfig, client: Any = None) -> Tracker:
    """A new parent run, tagged with the search and the metric."""
    base = sweep.base
    parent_cfg = base.model_copy(
        update={"tracking": base.tracking.model_copy(update={"run_name": sweep.parent_name()})}
    )
    parent = Tracker(parent_cfg.tracking, client)
    if parent.start(parent_cfg, tags={"convserve.kind": "sweep"}) is not None:
        parent.set_tags(search_tags(sweep))
    return parent


def search_tags(sweep: SweepConfig) -> dict[str, str]:
    """What the parent run says about its search."""
    space = {k: v.model_dump() if isinstance(v, Range) else v for k, v in sweep.grid.items()}
    return {
        "convserve.grid": json.dumps(space)[:5000],
        "convserve.metric": f"{sweep.direction} {sweep.metric}",
        "convserve.sampler": sweep.sampler,
        "convserve.pruner": sweep.pruner.name,
        "convserve.trials": str(sweep.size()),
    }


def run_trial(
    sweep: SweepConfig,
    parent_id: str | None,
    study: optuna.Study,
    storage: studies.Storage,
    client: Any,
    *,
    worker: str,
    settings: JobSettings,
    on_start: Callable[[int, int, dict[str, Any]], None] | None = None,
    on_step: Callable[..., Any] | None = None,
    parent_cancelled: Callable[[], bool] | None = None,
) -> TrialRow | None:
    """Take one waiting trial and train it as a child run of ``parent_id``; None when no
    trial waits. The child's writes go through a lease (``lease.py``): a worker whose trial
    was failed as stale while it was stopped writes nothing more when it resumes."""
    trial = studies.take(study)
    if trial is None:
        return None
    study.sampler = studies.make_sampler(sweep, trial.number)
    point = studies.suggest(trial, sweep)  # a trial handed back keeps its point
    trial.set_user_attr("point", json.dumps(point, sort_keys=True, default=str))
    resume_run = trial.user_attrs.get("resume_run") or None  # handed back by a drain
    for key in ("status", "error", "diagnosis", "run_id", "resume_run"):
        trial.set_user_attr(key, "")  # a retry carries its lost trial's attributes
    if on_start is not None:
        on_start(trial.number, sweep.size(), point)
    status, value, diagnosis, note = studies.FAILED, None, "", ""
    run_id: str | None = None
    writer: Any = None
    reporter = studies.Reporter(trial, sweep.metric)
    with studies.heartbeat(storage, trial, settings.heartbeat_interval):
        try:
            cfg = _trial_config(sweep, point, trial.number)
            resume: Path | None = None
            lease: Lease | None
            if resume_run is not None and client is not None:
                run_id, writer, lease, resume = _retake_child(
                    resume_run, trial, client, worker, settings
                )
            else:
                run_id, writer, lease = _child_run(
                    cfg, point, parent_id, trial, client, worker, settings
                )

            callbacks = _trial_callbacks(reporter, lease, on_step, parent_cancelled)
            outcome = train(cfg, run_id=run_id, callbacks=callbacks, client=writer, resume=resume)
            if outcome.status == "stopped":  # the worker drains: the trial waits again
                studies.hand_back(trial, run_id)
                log.info("trial %s handed back: %s", trial.number, outcome.message)
                return TrialRow(trial.number, point, "waiting", None, "", run_id, "")
            diagnosis = outcome.diagnosis.verdict
            status, value, note = _trial_outcome(outcome, sweep.metric, reporter.pruned())
        except Exception as err:  # a trial's failure is recorded; the study goes on
            log.warning("trial %s (%s) failed: %s", trial.number, point, err)
            note = f"{type(err).__name__}: {err}"
            if writer is not None and run_id is not None:
                _failed(writer, run_id, note)
        _tell(study, trial, status, value, diagnosis, note)
    return TrialRow(trial.number, point, status, value, diagnosis, run_id, note)


def _trial_callbacks(
    reporter: studies.Reporter,
    lease: Lease | None,
    on_step: Callable[..., Any] | None,
    parent_cancelled: Callable[[], bool] | None,
) -> Callbacks:
    """A trial stops when pruned, its lease lost or its sweep cancelled ("cancelled"), or when
    its worker drains ("stopped": it is handed back)."""

    def ended() -> bool:
        lost = lease is not None and not lease.held()
        return reporter.pruned() or lost or bool(parent_cancelled and parent_cancelled())

    def end_tags(status: str) -> dict[str, str]:
        # with the run's last tags, before it ends: a write after its end is refused, since
        # the lease reads a run that is no longer RUNNING as lost (lease.py)
        pruned = status == "cancelled" and reporter.pruned()  # as _trial_outcome reads it
        return {"convserve.trial_state": "pruned"} if pruned else {}

    return Callbacks(
        on_step=on_step,
        on_epoch=reporter.on_epoch,
        should_stop=lambda: ended() or draining.is_set(),
        stop_status=lambda: "cancelled" if ended() else "stopped",
        end_tags=end_tags,
    )


def _trial_config(sweep: SweepConfig, point: dict[str, Any], number: int) -> TrainConfig:
    """The point's training config, its run named after the trial."""
    cfg = sweep.point_config(point)
    name = f"#{number} {child_name(cfg, point)}"
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": name})})


def _trial_outcome(
    outcome: TrainResult, metric: str, pruned: bool
) -> tuple[str, float | None, str]:
    """A trained trial's status, value and note, from its run's outcome."""
    if outcome.status == "finished":
        value = outcome.metrics.get(metric)
        if value is None:
            return studies.FAILED, None, f"the run has no metric {metric!r}"
        return studies.FINISHED, value, outcome.message
    if outcome.status == "cancelled":
        return (studies.PRUNED if pruned else studies.CANCELLED), None, outcome.message
    return outcome.status, None, outcome.message  # diverged


def _child_run(
    cfg: TrainConfig,
    point: dict[str, Any],
    parent_id: str | None,
    trial: optuna.Trial,
    client: Any,
    worker: str,
    settings: JobSettings,
) -> tuple[str | None, Any, Lease | None]:
    """The trial's child run, created ``RUNNING`` under this worker and recorded on the trial
    at once, and the lease-guarded client its training writes through; (None, None, None)
    when the sweep is untracked."""
    if client is None or not cfg.tracking.enabled:
        return None, None, None
    experiment = get_or_create_experiment(client, cfg.tracking.experiment)
    tags = {
        "convserve.point": json.dumps(point, sort_keys=True, default=str)[:5000],
        "convserve.trial": str(trial.number),
        Tag.WORKER: worker,
        Tag.ATTEMPT: "1",
    }
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run = client.create_run(experiment, run_name=cfg.tracking.run_name, tags=tags)
    run_id = run.info.run_id
    trial.set_user_attr("run_id", run_id)  # the reaper fails this run if the worker is lost
    log_params(client, run_id, cfg)
    lease = Lease(client, run_id, worker, 1, settings.cancel_check_interval)
    return run_id, GuardedClient(client, lease), lease


def _retake_child(
    run_id: str, trial: optuna.Trial, client: Any, worker: str, settings: JobSettings
) -> tuple[str, Any, Lease, Path | None]:
    """A handed-back trial's child run, taken by this worker (its next attempt: the lease),
    and the checkpoint it stopped at (None: it had none; it starts over in the same run)."""
    attempt = int(client.get_run(run_id).data.tags.get(Tag.ATTEMPT, "1")) + 1
    client.log_batch(run_id, tags=run_tags({Tag.WORKER: worker, Tag.ATTEMPT: str(attempt)}))
    client.update_run(run_id, status="RUNNING")
    trial.set_user_attr("run_id", run_id)
    lease = Lease(client, run_id, worker, attempt, settings.cancel_check_interval)
    resume = last_checkpoint(client, run_id, settings.runs_dir)
    return run_id, GuardedClient(client, lease), lease, resume


def _failed(client: Any, run_id: str, error: str) -> None:
    """A child run that failed before its training started (a config the model cannot be
    built from) ends ``FAILED`` with the error, like one that failed while training."""
    if client.get_run(run_id).info.status == "RUNNING":
        message = redact(error)[:5000]  # redacted before it is cut: no half a password
        tags = run_tags({"convserve.status": "failed", "convserve.message": message})
        client.log_batch(run_id, tags=tags)
        client.set_terminated(run_id, status="FAILED")


def _tell(
    study: optuna.Study,
    trial: optuna.Trial,
    status: str,
    value: float | None,
    diagnosis: str,
    note: str,
) -> None:
    """The trial's outcome into the study; a trial that a reaper already failed (its worker
    was stopped past the limit) keeps that ending."""
    try:
        trial.set_user_attr("status", status)
        trial.set_user_attr("diagnosis", diagnosis)
        trial.set_user_attr("error", note[:2000])
        if status == studies.FINISHED:
            study.tell(trial, value)
        else:
            study.tell(
                trial, state=TrialState.PRUNED if status == studies.PRUNED else TrialState.FAIL
            )
    except Exception as err:  # UpdateFinishedTrialError, or the storage's refusal
        log.warning("trial %s: its outcome (%s) was not recorded: %s", trial.number, status, err)


def summarise(
    sweep: SweepConfig, parent_id: str, study: optuna.Study, client: Any
) -> tuple[list[TrialRow], list[str], Path]:
    """The summary of the trials so far in ``<output_dir>/<parent>/summary`` and, with a
    ``client``, on the parent run (its artifacts, and the progress tag): (rows, the table's
    lines, the folder)."""
    rows = studies.rows(study)
    folder = Path(sweep.base.tracking.output_dir) / parent_id / "summary"
    lines = write_summary(sweep, rows, folder)
    if client is not None:
        progress = json.dumps({"trials": studies.progress(study)})
        client.set_tag(parent_id, Tag.PROGRESS, progress)
        client.log_artifacts(parent_id, str(folder), "summary")
    return rows, lines, folder


def record_progress(client: Any, parent_id: str, sweep: SweepConfig, study: optuna.Study) -> None:
    """``summarise`` as trials end (each writer uploads a whole table, so the last one
    written is a complete one); a failed write is left to the next trial."""
    try:
        summarise(sweep, parent_id, study, client)
    except Exception as err:
        log.warning("sweep %s: progress not written: %s", parent_id, err)


def finish(
    sweep: SweepConfig,
    parent_id: str,
    study: optuna.Study,
    client: Any,
    policy: Policy | None,
    proceed: Callable[[], bool] | None = None,
) -> SweepResult:
    """The summary, the best finished trial on the parent and, with a ``policy``, published.
    Called once per sweep, by the one that took the publish ticket (or by ``run_sweep``)."""
    rows, lines, folder = summarise(sweep, parent_id, study, client)
    result = SweepResult(parent_id if client else None, rows, None, folder=folder, summary=lines)
    finished = [r for r in rows if r.status == studies.FINISHED and r.value is not None]
    if client is not None:
        client.set_tag(parent_id, Tag.PROGRESS, json.dumps({"trials": studies.progress(study)}))
        client.log_artifacts(parent_id, str(folder), "summary")
    if not finished:
        return result
    pick = max if sweep.direction == "maximize" else min
    best = pick(finished, key=lambda r: r.value)  # type: ignore[arg-type,return-value]
    result.best_run_id = best.run_id
    if client is None or best.run_id is None:
        return result
    # the best trial's figure, under its own name: parents compare as their children do
    client.log_metric(parent_id, sweep.metric, float(best.value), step=0)  # type: ignore[arg-type]
    client.set_tag(parent_id, "convserve.best_run_id", best.run_id)
    client.set_tag(parent_id, "convserve.best_trial", str(best.number))
    if policy is not None:
        result.published = publish(
            run_id=best.run_id, policy=policy, proceed=proceed, client=client
        )
    return result


def write_summary(sweep: SweepConfig, rows: list[TrialRow], folder: Path) -> list[str]:
    """``sweep.csv``, ``sweep.md`` and a figure in ``folder``: ``heatmap.png`` for a grid over
    one or two fields, ``trials.png`` (the metric by trial, and the best so far) otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sweep.grid)
    header = ["trial", *keys, "status", sweep.metric, "diagnosis", "run_id", "note"]
    table = [
        [
            str(r.number),
            *(label(r.point[k]) if k in r.point else "" for k in keys),
            r.status,
            "" if r.value is None else f"{r.value:.4f}",
            r.diagnosis,
            r.run_id or "",
            r.note.replace("\n", " ")[:200],
        ]
        for r in rows
    ]
    with open(folder / "sweep.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    counted = {s: sum(r.status == s for r in rows) for s in ("finished", "pruned")}
    lines = [
        f"# Sweep {sweep.name or ''}".rstrip(),
        "",
        f"{sweep.sampler} search, {sweep.direction} `{sweep.metric}`: {len(rows)} of "
        f"{sweep.size()} trials ran, {counted['finished']} finished, {counted['pruned']} pruned.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table]
    (folder / "sweep.md").write_text("\n".join(lines) + "\n")
    if sweep.sampler == "grid" and 1 <= len(keys) <= 2:
        _heatmap(sweep, rows, folder / "heatmap.png")
    elif rows:
        _history(sweep, rows, folder / "trials.png")
    return lines


def _heatmap(sweep: SweepConfig, rows: list[TrialRow], path: Path) -> None:
    import numpy as np

    keys = list(sweep.grid)
    values = [v for v in sweep.grid.values() if isinstance(v, list)]
    ys = [label(v) for v in values[0]]
    xs = [label(v) for v in values[1]] if len(keys) == 2 else [sweep.metric]
    grid = np.full((len(ys), len(xs)), np.nan)
    notes = np.full((len(ys), len(xs)), "", dtype=object)
    for r in rows:
        if r.status in ("running", "lost") or keys[0] not in r.point:
            continue  # a lost trial's retry has its own row
        i = ys.index(label(r.point[keys[0]]))
        j = xs.index(label(r.point[keys[1]])) if len(keys) == 2 else 0
        grid[i, j] = math.nan if r.value is None else r.value
        notes[i, j] = (
            (f"{r.value:.3f}" if r.value is not None else r.status)
            + "\n"
            + ("" if r.diagnosis in ("healthy", "") else r.diagnosis)
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


def _history(sweep: SweepConfig, rows: list[TrialRow], path: Path) -> None:
    """The metric of each finished trial by trial number, pruned trials at the value they
    were stopped with, and the best so far."""
    fig, ax = subplots(figsize=(6.4, 3.6))
    done = [r for r in rows if r.value is not None]
    ax.scatter([r.number for r in done], [r.value for r in done], s=18, label="finished")
    pruned = [r for r in rows if r.status == "pruned" and r.reported is not None]
    if pruned:
        ax.scatter(
            [r.number for r in pruned],
            [r.reported for r in pruned],
            marker="x",
            label="pruned (last value reported)",
        )
    best, line = None, []
    pick = max if sweep.direction == "maximize" else min
    for r in sorted(done, key=lambda r: r.number):
        best = r.value if best is None else pick(best, r.value)  # type: ignore[type-var]
        line.append((r.number, best))
    if line:
        ax.step(*zip(*line, strict=True), where="post", label="best so far")
    ax.set(xlabel="trial", ylabel=sweep.metric, title=f"{sweep.sampler} search")
    ax.legend(fontsize=8)
    save_figure(fig, path)
