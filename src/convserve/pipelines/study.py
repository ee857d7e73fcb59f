"""Sweeps as Optuna studies whose trials are child runs of one MLflow parent run.

A sweep's study is created with one ``WAITING`` trial per point it will train (every grid
combination, with its values fixed; or ``trials`` empty ones that the random or TPE sampler
fills when the trial starts). Whoever trains takes a trial by moving it from ``WAITING`` to
``RUNNING``, which the storage does for one taker only: with any number of workers, each
trial runs once. A trial reports its validation metric after every epoch, so that the pruner
can stop it, and records Optuna heartbeats while it trains: a trial whose worker died is
failed by the next reaper pass and, while it has retries left, put back as a new ``WAITING``
trial with the same values.

When no trial is waiting or running, the study is done, and its results are published once:
whoever first takes the study's one *publish ticket* (a trial in a second, one-trial study,
taken the same way) does it, or hands it to the sweep job on the queue (``worker.py``).

The study storage is Optuna's own: ``CONVSERVE_STUDY_STORAGE`` (a SQLAlchemy URL: PostgreSQL
in the compose stack), else a SQLite file next to the local queue.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from convserve.training.config import Range, SweepConfig

if TYPE_CHECKING:
    from convserve.jobs import JobSettings

log = logging.getLogger(__name__)
# the study storage a worker opens (``open_storage``): a database, with trial heartbeats
Storage = optuna.storages.RDBStorage
optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats are "experimental" in Optuna's words; they are what makes a lost trial visible
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# A trial's outcome, as the summary and the job API show it.
FINISHED, PRUNED, DIVERGED, FAILED, CANCELLED, LOST = (
    "finished",
    "pruned",
    "diverged",
    "failed",
    "cancelled",
    "lost",
)


def storage_url(settings: JobSettings) -> str:
    """``CONVSERVE_STUDY_STORAGE``, else ``studies.db`` (SQLite) beside the local queue file.
    ``postgresql://`` (as PostgreSQL's own tools write it) means the psycopg2 driver, the
    one installed: SQLAlchemy would pick psycopg 3 for it."""
    if settings.study_storage:
        return _with_driver(settings.study_storage)
    folder = os.path.dirname(os.path.abspath(settings.queue_path))
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'studies.db')}"


def _with_driver(url: str) -> str:
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain) and importlib.util.find_spec("psycopg") is None:
            return "postgresql+psycopg2://" + url.removeprefix(plain)
    return url


_storages: dict[str, optuna.storages.RDBStorage] = {}
CONNECT_TIMEOUT_SECONDS = 10  # a database that does not answer: an error, not a hang


def open_storage(settings: JobSettings) -> Storage:
    """The study storage, one per process (a pool of database connections), with heartbeats:
    a running trial whose heartbeat is older than ``worker_lost_after`` seconds is stale (its
    worker is gone); whichever reaper fails it (``optuna.storages.fail_stale_trials``) fails
    its child run too ("worker lost") and puts a copy with the same values back, waiting,
    while the trial has retries left (``CONVSERVE_JOB_RETRIES``)."""
    url = storage_url(settings)
    if url not in _storages:
        _storages[url] = _new_storage(url, settings)
    return _storages[url]


CREATE_TRIES = 5  # workers starting together on a new database race to create its tables
# what the loser's CREATE or first INSERT says: PostgreSQL's and SQLite's words
_CREATE_RACES = ("already exists", "duplicate key", "UNIQUE constraint failed")


def _new_storage(url: str, settings: JobSettings) -> Storage:
    """Optuna's storage on ``url``, whose tables it creates on a new database: two workers
    that start together both try, and the loser's ``CREATE`` fails on what the winner just
    made (PostgreSQL: a unique violation in ``pg_type``; SQLite: on ``alembic_version``); it
    tries again, and then finds them."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    def create() -> Storage:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=max(1, math.ceil(settings.heartbeat_interval)),
            grace_period=max(1, math.ceil(settings.worker_lost_after)),
            heartbeat_stale_trial_callback=_LostTrial(settings.job_retries),
        )

    for attempt in range(1, CREATE_TRIES):
        try:
            return create()
        except (IntegrityError, ProgrammingError, OperationalError) as err:
            if not any(race in str(err) for race in _CREATE_RACES):
                raise
            log.info("the study storage's tables are being created elsewhere; trying again")
            time.sleep(0.2 * attempt)
    return create()


def _engine_kwargs(url: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql")):  # psycopg2's and the MySQL drivers' name
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    return kwargs


class _LostTrial:
    """Called once for each stale trial, by the reaper that failed it."""

    def __init__(self, retries: int) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from mlflow.entities import RunTag

        from convserve.training.tracking import mlflow_client

        client = mlflow_client()
        error = f"worker lost: trial {trial.number}'s heartbeat stopped"
        for child in _trial_runs(client, study.study_name, trial):
            client.log_batch(child, tags=[RunTag("convserve.error", error)])
            client.set_terminated(child, status="FAILED")
        log.warning("%s: trial %s lost with its worker", study.study_name, trial.number)
        self.retry(study, trial)


def _trial_runs(client: Any, name: str, trial: optuna.trial.FrozenTrial) -> list[str]:
    """The trial's child run: the one it recorded, else (its worker was lost between creating
    the run and recording it) the parent's running child tagged with the trial's number."""
    if trial.user_attrs.get("run_id"):
        return [trial.user_attrs["run_id"]]
    from convserve.jobs import search_everywhere

    parent = name.removeprefix(study_name(""))
    query = (
        f"tags.mlflow.parentRunId = '{parent}' and tags.`convserve.trial` = '{trial.number}' "
        "and attributes.status = 'RUNNING'"
    )
    return [r.info.run_id for r in search_everywhere(client, query)]


def study_name(parent_run_id: str) -> str:
    return f"convserve-{parent_run_id}"


def make_pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    pruner = sweep.pruner
    if pruner.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_epochs
        )
    if pruner.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=sweep.base.optim.epochs)
    return optuna.pruners.NopPruner()


def make_sampler(sweep: SweepConfig, number: int) -> optuna.samplers.BaseSampler:
    """The sampler for trial ``number``, seeded from the base seed and the number: a study is
    reproducible when its trials run one after another, and parallel takers never draw the
    same sequence."""
    seed = sweep.base.seed * 100_003 + number
    if sweep.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid trials have every value fixed


def _choice(value: Any) -> Any:
    """How a grid value is stored in the study: itself when Optuna can store it, else JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def load(sweep: SweepConfig, parent_run_id: str, storage: Storage, number: int = 0) -> optuna.Study:
    return optuna.load_study(
        study_name=study_name(parent_run_id),
        storage=storage,
        sampler=make_sampler(sweep, number),
        pruner=make_pruner(sweep),
    )


def ensure(sweep: SweepConfig, parent_run_id: str, storage: Storage) -> optuna.Study:
    """The sweep's study and its publish ticket, with one ``WAITING`` trial per point to
    train. Safe to call again (a sweep job run again after its worker was lost): it adds only
    the trials that are missing."""
    study = optuna.create_study(
        study_name=study_name(parent_run_id),
        storage=storage,
        direction=sweep.direction,
        load_if_exists=True,
        sampler=make_sampler(sweep, 0),
        pruner=make_pruner(sweep),
    )
    tickets = optuna.create_study(
        study_name=study_name(parent_run_id) + "-publish", storage=storage, load_if_exists=True
    )
    if not tickets.get_trials(deepcopy=False):
        tickets.enqueue_trial({})
    planned = [t for t in study.get_trials(deepcopy=False) if "failed_trial" not in t.system_attrs]
    if sweep.sampler == "grid":
        points = [point for point, _ in sweep.combinations()]
    else:
        points = [{} for _ in range(sweep.size())]
    for point in points[len(planned) :]:
        study.enqueue_trial({k: _choice(v) for k, v in point.items()}, skip_if_exists=False)
    study.set_user_attr("sampler", sweep.sampler)
    return study


def take(study: optuna.Study) -> optuna.Trial | None:
    """Take one ``WAITING`` trial (for this caller only), or None when none is left."""
    trial_id = study._pop_waiting_trial_id()  # the storage's atomic WAITING -> RUNNING
    return None if trial_id is None else optuna.Trial(study, trial_id)


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> dict[str, Any]:
    """The trial's point: fixed values (a grid point, a retry) or the sampler's picks."""
    point: dict[str, Any] = {}
    for key, values in sweep.grid.items():
        if isinstance(values, Range):
            if values.integer:
                step = int(values.step or 1)
                point[key] = trial.suggest_int(
                    key, int(values.low), int(values.high), step=step, log=values.log
                )
            else:
                point[key] = trial.suggest_float(
                    key, values.low, values.high, step=values.step, log=values.log
                )
        else:
            choices = [_choice(v) for v in values]
            picked = trial.suggest_categorical(key, choices)
            point[key] = values[choices.index(picked)]
    return point


def counts(study: optuna.Study) -> dict[str, int]:
    """How many trials are in each state: ``{"waiting": 2, "running": 1, "complete": 3, ...}``."""
    out = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        out[trial.state.name.lower()] += 1
    return out


def done(study: optuna.Study) -> bool:
    """No trial waits or runs."""
    c = counts(study)
    return c["waiting"] == 0 and c["running"] == 0


def take_publish_ticket(study: optuna.Study, storage: Storage) -> bool:
    """True for the one caller that takes the study's publish ticket; False for every other
    (and for any caller while trials still wait or run)."""
    if not done(study):
        return False
    tickets = optuna.load_study(study_name=study.study_name + "-publish", storage=storage)
    ticket = take(tickets)
    if ticket is None:
        return False
    tickets.tell(ticket, 1.0)  # taken for good: nothing is left for a reaper to find stale
    return True


def hand_back(trial: optuna.Trial, run_id: str | None) -> None:
    """A trial stopped by its draining worker waits again, to be taken by any worker, which
    resumes its child run ``run_id`` from the checkpoint it kept."""
    trial.set_user_attr("resume_run", run_id or "")
    trial.set_user_attr("status", "waiting")
    trial.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)


def fail_waiting(study: optuna.Study, status: str) -> int:
    """Take every waiting trial and fail it with ``status`` (a cancelled sweep)."""
    n = 0
    while (trial := take(study)) is not None:
        trial.set_user_attr("status", status)
        study.tell(trial, state=TrialState.FAIL)
        n += 1
    return n


@contextmanager
def heartbeat(storage: Storage, trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Records the trial's heartbeat every ``interval`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial._trial_id)
            except Exception as err:  # the storage may blink; beat again next time
                log.warning("heartbeat of trial %s failed: %s", trial.number, err)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"trial-{trial.number}-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


class Reporter:
    """Reports the validation metric to the trial after each epoch and says when the pruner
    stops it (``Callbacks.on_epoch`` and ``should_stop``)."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        # the per-epoch value the sweep's metric is made of: best_val_accuracy <- val_accuracy
        self.metric = metric.removeprefix("best_")
        self.pruned_at: int | None = None

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value) or self.pruned_at is not None:
            return
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch

    def pruned(self) -> bool:
        return self.pruned_at is not None


@dataclass
class TrialRow:
    """One trial as the summary shows it."""

    number: int
    point: dict[str, Any]
    status: str
    value: float | None
    diagnosis: str
    run_id: str | None
    note: str = ""
    reported: float | None = None  # the last value reported to the pruner


def rows(study: optuna.Study) -> list[TrialRow]:
    """Every trial that was taken, in trial order; a retried trial shows as ``lost``."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        status = t.user_attrs.get("status", "")
        if t.state == TrialState.RUNNING:
            status = "running"
        elif t.state == TrialState.FAIL and not status:
            status = LOST
        elif t.state == TrialState.PRUNED:
            status = PRUNED
        note = t.user_attrs.get("error", "")
        reported = None
        if t.intermediate_values:
            reported = t.intermediate_values[max(t.intermediate_values)]
        if t.state == TrialState.PRUNED and reported is not None:
            note = f"pruned after epoch {max(t.intermediate_values)} ({reported:.4f})"
        if status == LOST:
            note = "worker lost (a retry, if one was left, has its own row)"
        out.append(
            TrialRow(
                t.number,
                json.loads(t.user_attrs.get("point", "{}")),
                status,
                t.value if t.state == TrialState.COMPLETE else None,
                t.user_attrs.get("diagnosis", ""),
                t.user_attrs.get("run_id") or None,
                note,
                reported,
            )
        )
    return out


def progress(study: optuna.Study) -> dict[str, int]:
    """The sweep's progress for the job API: trials planned, waiting, running, and by
    outcome."""
    c = counts(study)
    planned = len(
        [t for t in study.get_trials(deepcopy=False) if "failed_trial" not in t.system_attrs]
    )
    return {
        "trials": planned,
        "waiting": c["waiting"],
        "running": c["running"],
        "finished": c["complete"],
        "pruned": c["pruned"],
        "failed": c["fail"],
    }
