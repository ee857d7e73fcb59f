"""``/jobs``: submit, watch and cancel training jobs. A job is an MLflow run; its id is the
run id, so the MLflow UI is also the job dashboard."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from convserve.jobs import JobRequest, JobStatus, Tag, cancel, job_status, search_jobs, submit
from convserve.service.api.backends import not_found
from convserve.service.api.deps import SettingsDep, TokenDep
from convserve.service.api.errors import errors
from convserve.training.uploads import find

router = APIRouter(prefix="/jobs", tags=["jobs"])


class TrialsProgress(BaseModel):
    """A sweep's Optuna study: trials planned, and how many are in each state."""

    trials: int = Field(description="Trials the study plans (grid points, or `trials`)")
    waiting: int
    running: int
    finished: int
    pruned: int
    failed: int = Field(description="Failed, diverged, cancelled or lost with a worker")


class Progress(BaseModel):
    epoch: int | None = None
    step: int | None = None
    total: int | None = Field(None, description="Total optimizer steps of the run")
    trials: TrialsProgress | None = Field(None, description="A sweep's trials")


_JOB_EXAMPLE: dict[str, Any] = {
    "id": "5c0ffee0a1b2c3d4e5f60718293a4b5c",
    "status": "succeeded",
    "kind": "train",
    "name": "digits-relu-he_normal-16x32",
    "dataset": "digits",
    "created_at": "2026-11-30T10:00:00+00:00",
    "progress": {"epoch": 3, "step": 213, "total": 213},
    "metrics": {"val_accuracy": 0.962, "best_val_accuracy": 0.962, "test_accuracy": 0.964},
    "diagnosis": {
        "verdict": "healthy",
        "summary": "healthy throughout",
        "evidence": "",
        "advice": "",
        "consequences": [],
        "phases": [
            {"name": "initialisation", "steps": [1, 1], "verdict": "healthy", "evidence": ""},
            {"name": "training", "steps": [51, 151], "verdict": "healthy", "evidence": ""},
            {"name": "end", "steps": [201, 201], "verdict": "healthy", "evidence": ""},
        ],
    },
    "error": None,
    "registered_model": "convserve",
    "registered_version": "4",
    "promoted": True,
    "attempts": [{"attempt": 1, "worker": "worker-1:4242:1", "ended": None}],
    "links": {
        "self": "http://127.0.0.1:8000/jobs/5c0ffee0a1b2c3d4e5f60718293a4b5c",
        "mlflow": "http://127.0.0.1:5000/#/experiments/1/runs/5c0ffee0a1b2c3d4e5f60718293a4b5c",
        "mlflow_runs": "http://127.0.0.1:5000/#/experiments/1/runs",
    },
}


class Attempt(BaseModel):
    attempt: int = Field(description="1 for the first run of the job")
    worker: str = Field(description="host:pid:thread of the worker that ran it")
    ended: str | None = Field(
        None, description="Why it ended, for an attempt that was handed back or lost"
    )


class DiagnosisPhase(BaseModel):
    name: str = Field(description="initialisation, training, end (latest while running)")
    steps: tuple[int, int] = Field(description="First and last snapshot step of the phase")
    verdict: str
    evidence: str = Field(description="The verdict's layer, statistic, step and threshold")
    consequences: list[str] = Field(
        default_factory=list, description="Findings the verdict explains, with the reason"
    )
    also: list[str] = Field(
        default_factory=list, description="Findings the verdict does not explain"
    )


class JobDiagnosis(BaseModel):
    verdict: str = Field(
        description="The cause: symmetric, exploding, saturated, dying, vanishing, healthy, "
        "or unmeasured (diagnostics off)"
    )
    summary: str = Field(description="The verdict by phase, e.g. 'symmetric throughout'")
    evidence: str = Field(description="What the cause was read from, in words and figures")
    advice: str = Field(description="What to change in the config, the knob's change first")
    consequences: list[str] = Field(description="Findings that follow from the cause")
    phases: list[DiagnosisPhase]
    knob: str = Field(
        "",
        description="The configuration knob most likely responsible: init.name, init.scale, "
        "init.bias, optim.lr, model.activation or depth ('' when healthy)",
    )
    attribution: str = Field(
        "", description="The evidence that separates that knob from the other candidates"
    )


class Job(BaseModel):
    model_config = {"json_schema_extra": {"examples": [_JOB_EXAMPLE]}}

    id: str = Field(description="The MLflow run id")
    status: JobStatus
    kind: str | None = Field(None, description="train or sweep")
    name: str | None = Field(
        None,
        description="The run's name: data set, activation, initialiser, filters per block "
        "(and hidden layers), unless the config names it; a sweep's own name",
    )
    dataset: str | None = Field(
        None, description="What it trains on: a built-in set's name, or an uploaded set's"
    )
    created_at: str
    progress: Progress
    metrics: dict[str, float] = Field(description="Latest value of every epoch-level metric")
    diagnosis: JobDiagnosis | None = Field(
        None,
        description="The diagnostics' reading of the run: one cause with its evidence and "
        "advice, updated at every snapshot while the job runs; null before the first",
    )
    error: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
    promoted: bool | None = Field(
        None,
        description="Whether the champion alias moved to the registered version; null "
        "while nothing is registered",
    )
    attempts: list[Attempt] = Field(
        default_factory=list,
        description="Every attempt so far: a job handed back by its draining worker goes on "
        "from the step it stopped at; one lost with its worker runs again "
        "(CONVSERVE_JOB_RETRIES) from its last checkpoint",
    )
    links: dict[str, str]


class Series(BaseModel):
    steps: list[int] = Field(description="Optimizer steps of the snapshots")
    values: list[float | None] = Field(description="The values; null where not finite")


class JobDiagnostics(BaseModel):
    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "id": _JOB_EXAMPLE["id"],
                    "name": "digits-relu-he_normal-16x32",
                    "activation": "relu",
                    "status": "running",
                    "diagnosis": {
                        **_JOB_EXAMPLE["diagnosis"],
                        "summary": "healthy throughout",
                        "phases": _JOB_EXAMPLE["diagnosis"]["phases"][:1],
                    },
                    "layers": ["block1.conv", "block2.conv", "head.out"],
                    "statistics": {
                        "grad_std": {
                            "block1.conv": {"steps": [1, 51], "values": [0.0021, 0.0018]},
                            "block2.conv": {"steps": [1, 51], "values": [0.0034, 0.0025]},
                            "head.out": {"steps": [1, 51], "values": [0.0098, 0.0061]},
                        }
                    },
                    "ratios": {"grad_ratio": {"steps": [1, 51], "values": [0.62, 0.72]}},
                }
            ]
        }
    }

    id: str
    name: str | None = Field(
        None, description="The run's name (data set, activation, init, filters)"
    )
    activation: str | None = Field(
        None,
        description="The model's activation: which statistics apply (dead units to the ReLU "
        "family, saturation to sigmoid and tanh)",
    )
    status: JobStatus
    diagnosis: JobDiagnosis | None
    layers: list[str] = Field(description="Measured layers, input to output")
    statistics: dict[str, dict[str, Series]] = Field(
        description="Per statistic (grad_std, act_std, dead, saturated, update_ratio, "
        "distinct, ...), per layer: its value at every snapshot so far"
    )
    ratios: dict[str, Series] = Field(
        description="grad_ratio and act_growth (first over last hidden layer) at every snapshot"
    )


class JobPage(BaseModel):
    jobs: list[Job]
    next_page_token: str | None = Field(None, description="Pass as page_token for the next page")

    model_config = {
        "json_schema_extra": {"examples": [{"jobs": [_JOB_EXAMPLE], "next_page_token": None}]}
    }


_SUMMARY = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "best_val_accuracy",
    "test_accuracy",
    "test_loss",
    "epoch",
    "onnx_parity_max_abs_diff",
)


def _links(request: Request, run: Any, ui: str | None) -> dict[str, str]:
    links = {"self": str(request.url_for("get_job", job_id=run.info.run_id))}
    if ui:
        # MLflow 3's routes: the experiment's runs table, and the run's own page (the bare
        # experiment URL opens its Traces tab).
        runs = f"{ui.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs"
        links["mlflow"] = f"{runs}/{run.info.run_id}"
        links["mlflow_runs"] = runs
    return links


def to_job(run: Any, request: Request, ui: str | None) -> Job:
    tags = run.data.tags
    try:
        progress = Progress(**json.loads(tags.get(Tag.PROGRESS, "{}")))
    except (ValueError, TypeError):
        progress = Progress()
    promoted = tags.get("convserve.promoted")
    status = job_status(run)
    failed = status == "failed"
    return Job(
        id=run.info.run_id,
        status=status,
        kind=tags.get(Tag.JOB_KIND),
        name=run.info.run_name,
        dataset=_dataset(run),
        created_at=datetime.fromtimestamp(run.info.start_time / 1000, UTC).isoformat(),
        progress=progress,
        metrics={k: v for k, v in run.data.metrics.items() if k in _SUMMARY},
        diagnosis=_diagnosis(tags),
        error=(tags.get(Tag.ERROR) or tags.get("convserve.message")) if failed else None,
        registered_model=tags.get("convserve.registered_model"),
        registered_version=tags.get("convserve.registered_version"),
        promoted=None if promoted is None else promoted == "true",
        attempts=_attempts(tags),
        links=_links(request, run, ui),
    )


def _dataset(run: Any) -> str | None:
    """The data set's name once training has read it (an upload's name), else the config's
    (an upload by the id or name it was given)."""
    read = run.data.tags.get("convserve.dataset", "")  # an upload's: dataset:<name>@<id>
    if read:
        return read.removeprefix("dataset:").split("@")[0]
    params = run.data.params
    named = params.get("data.id") if params.get("data.name") == "dataset" else None
    return named or params.get("data.name")


def _diagnosis(tags: dict[str, str]) -> JobDiagnosis | None:
    try:
        return JobDiagnosis.model_validate_json(tags["convserve.diagnosis.json"])
    except (KeyError, ValueError):
        return None


def _attempts(tags: dict[str, str]) -> list[Attempt]:
    """The attempts handed back by a draining worker or lost (recorded by the reaper), then
    the current one (once a worker took the job)."""
    try:
        past = [Attempt(**a) for a in json.loads(tags.get(Tag.ATTEMPTS, "[]"))]
    except (ValueError, TypeError):
        past = []
    if tags.get(Tag.WORKER):
        current = int(tags.get(Tag.ATTEMPT, "1"))
        if not any(a.attempt == current for a in past):
            past.append(Attempt(attempt=current, worker=tags[Tag.WORKER]))
    return past


def _state(request: Request) -> Any:
    return request.app.state.jobs


async def _run(request: Request, fn: Any, *args: Any) -> Any:
    """MLflow's client is blocking, and so is its first use (the import takes a second or
    more): keep both off the event loop (``jobs.client`` is read inside ``fn``), bounded in
    time; MLflow or the queue failing answers 503 (``backends.py``)."""
    return await _state(request).call(fn, *args)


@router.post(
    "",
    status_code=202,
    response_model=Job,
    responses=errors(
        400,
        401,
        422,
        429,
        503,
        e400="A body that is not JSON",
        e422="Invalid body, a data set that needs data.root without one, or an uploaded data "
        "set that does not exist (the detail names each field); nothing is queued",
        e503="MLflow or the queue cannot be reached; nothing is queued",
    ),
    summary="Queue a training run or a sweep",
)
async def create_job(
    body: JobRequest, request: Request, _: TokenDep, settings: SettingsDep
) -> JSONResponse:
    """The body holds ``train`` (a training config) or ``sweep`` (a base config and a grid),
    the same schema as the CLI's YAML files, plus ``register``, ``promote``, ``model_name``
    and ``margin``. Answers 202 with the job; the job id is the MLflow run id."""
    jobs = _state(request)
    pending = await _run(request, lambda: jobs.queue.pending_count())
    if pending >= jobs.settings.max_queued_jobs:
        raise HTTPException(
            429,
            f"{pending} jobs are already queued (limit "
            f"{jobs.settings.max_queued_jobs}, CONVSERVE_MAX_QUEUED_JOBS); "
            "try again when some have started",
            headers={"Retry-After": "30"},
        )
    named = _uploaded_datasets(body)
    if named:
        missing = await _run(
            request, lambda: [(d, loc) for d, loc in named.items() if not find(jobs.client, d)]
        )
        if missing:
            raise RequestValidationError(
                [
                    {
                        "loc": loc,
                        "msg": f"no uploaded data set {dataset!r} (an id or a name): "
                        "GET /datasets lists them, POST /datasets adds one",
                        "type": "value_error",
                        "input": dataset,
                    }
                    for dataset, loc in missing
                ]
            )
    run_id = await _run(request, lambda: submit(body, jobs.client, jobs.queue))
    run = await _run(request, lambda: jobs.client.get_run(run_id))
    job = to_job(run, request, settings.mlflow_ui_url)
    return JSONResponse(job.model_dump(), status_code=202, headers={"Location": job.links["self"]})


def _uploaded_datasets(body: JobRequest) -> dict[str, tuple[str, ...]]:
    """The uploaded data sets (ids or names) the job would train on, each with the field of
    the body that names it: a train job's, or a sweep's base and grid points'."""
    if body.train is not None:
        data = body.train.data
        uploaded = data.id if data.name == "dataset" else None
        return {uploaded: ("body", "train", "data", "id")} if uploaded else {}
    sweep = body.sweep
    assert sweep is not None
    base = sweep.base.data.id if sweep.base.data.name == "dataset" else None
    loc: tuple[str, ...] = ("body", "sweep", "base", "data", "id")
    keys = [k for k in sweep.grid if k in ("data", "data.id", "data.name")]
    if not keys:  # the grid leaves the data alone: every trial trains on the base's
        return {base: loc} if base else {}
    configs = [sweep.base]
    if sweep.sampler == "grid":
        configs += [config for _, config in sweep.combinations()]
    else:  # each value alone on the base, as the study will draw them
        lists = {k: v for k, v in sweep.grid.items() if isinstance(v, list)}
        configs += [sweep.point_config({k: v}) for k, vs in lists.items() for v in vs]
    named = {c.data.id: loc for c in configs if c.data.name == "dataset" and c.data.id}
    for dataset in named:
        if dataset != base:  # a grid's value
            named[dataset] = ("body", "sweep", "grid", keys[0])
    return named


@router.get("", response_model=JobPage, summary="Jobs, newest first", responses=errors(422))
async def list_jobs(
    request: Request,
    settings: SettingsDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state")] = None,
    page_size: Annotated[int, Query(ge=1, le=200, description="Jobs per page")] = 50,
    page_token: Annotated[
        str | None, Query(description="next_page_token of the previous page")
    ] = None,
) -> JobPage:
    """Every job across experiments, newest first, a page at a time."""
    jobs = _state(request)

    if page_token is not None and not _looks_like_a_page_token(page_token):
        raise _bad_token()

    def search() -> Any:
        from mlflow.exceptions import MlflowException

        try:
            page = search_jobs(
                jobs.client,
                f"tags.`convserve.job_status` = '{status}'" if status is not None else "",
                max_results=page_size,
                order_by=["attributes.start_time DESC"],
                page_token=page_token,
            )
        except MlflowException as err:
            if page_token is not None and "token" in str(err).lower():
                raise _bad_token() from None
            raise
        return list(page), page.token

    runs, token = await _run(request, search)
    found = [to_job(r, request, settings.mlflow_ui_url) for r in runs]
    if status is not None:  # the tag lags the run's status after a reaper or cancel
        found = [j for j in found if j.status == status]
    return JobPage(jobs=found, next_page_token=token or None)


def _looks_like_a_page_token(token: str) -> bool:
    """MLflow's page tokens are base64 JSON objects (``{"offset": 50}``)."""
    try:
        return isinstance(json.loads(base64.b64decode(token, validate=True)), dict)
    except (ValueError, TypeError):  # not ASCII, not base64, not JSON
        return False


def _bad_token() -> HTTPException:
    return HTTPException(422, "page_token: not a token from a previous page (next_page_token)")


def _get(jobs: Any, job_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        run = jobs.client.get_run(job_id)
    except MlflowException as err:
        if not_found(err) or "invalid" in str(err).lower():  # an id MLflow never made
            raise HTTPException(404, f"no job {job_id}") from None
        raise  # MLflow unwell: 503 (backends.py)
    if run.data.tags.get(Tag.KIND) != "job":
        raise HTTPException(404, f"run {job_id} is not a job")
    return run


JobId = Annotated[str, Path(description="The job id, which is its MLflow run id")]


@router.get(
    "/{job_id}",
    response_model=Job,
    name="get_job",
    summary="One job",
    responses=errors(404, e404="No job with this id"),
)
async def get_job(job_id: JobId, request: Request, settings: SettingsDep) -> Job:
    """The job's status, progress, latest metrics, the diagnosis, its error if it
    failed, the registered version and whether it became the champion."""
    run = await _run(request, _get, _state(request), job_id)
    return to_job(run, request, settings.mlflow_ui_url)


def _layer_order(layer: str) -> tuple[int, int]:
    """block1.conv, block2.conv, ..., head.fc1, ..., head.out: the forward order."""
    number = int(m.group(1)) if (m := re.search(r"(\d+)", layer)) else 0
    return (0 if layer.startswith("block") else 2 if layer == "head.out" else 1, number)


async def _diagnostics(request: Request, job_id: str) -> tuple[Any, dict[str, Series]]:
    """The job's run and the history of each of its ``diag.*`` metrics, read from MLflow a
    few at a time (as many as the backends' threads)."""
    jobs = _state(request)
    run = await _run(request, _get, jobs, job_id)
    keys = sorted(k for k in run.data.metrics if k.startswith("diag."))

    def history(key: str) -> Series:
        points = sorted(jobs.client.get_metric_history(job_id, key), key=lambda m: m.step)
        return Series(
            steps=[m.step for m in points],
            values=[m.value if math.isfinite(m.value) else None for m in points],
        )

    histories = await asyncio.gather(*(_run(request, history, key) for key in keys))
    return run, dict(zip(keys, histories, strict=True))


@router.get(
    "/{job_id}/diagnostics",
    response_model=JobDiagnostics,
    summary="A job's diagnostics over time",
    responses=errors(404, e404="No job with this id"),
)
async def get_job_diagnostics(job_id: JobId, request: Request) -> JobDiagnostics:
    """Every per-layer diagnostic statistic of the job at every snapshot so far, with the
    current diagnosis: what the web page charts while the job trains, and what it compares
    between two jobs. Read from the run's metrics in MLflow. A sweep job's statistics are
    on its child runs, so its own lists are empty."""
    run, series = await _diagnostics(request, job_id)
    statistics: dict[str, dict[str, Series]] = {}
    ratios: dict[str, Series] = {}
    for key, values in series.items():
        name = key.removeprefix("diag.")
        layer, _, stat = name.rpartition(".")
        if layer:
            statistics.setdefault(stat, {})[layer] = values
        else:
            ratios[stat] = values
    layers = sorted(
        {layer for by_layer in statistics.values() for layer in by_layer}, key=_layer_order
    )
    return JobDiagnostics(
        id=run.info.run_id,
        name=run.data.tags.get("mlflow.runName"),
        activation=run.data.params.get("model.activation"),
        status=job_status(run),
        diagnosis=_diagnosis(run.data.tags),
        layers=layers,
        statistics={
            stat: {layer: by_layer[layer] for layer in layers if layer in by_layer}
            for stat, by_layer in statistics.items()
        },
        ratios=ratios,
    )


@router.delete(
    "/{job_id}",
    response_model=Job,
    summary="Cancel a job",
    responses=errors(401, 404, e404="No job with this id"),
)
async def delete_job(job_id: JobId, request: Request, _: TokenDep, settings: SettingsDep) -> Job:
    """A queued job never starts; a running job stops at the next step boundary, keeps its
    last checkpoint and ends ``cancelled``. Ended jobs are left as they are."""
    jobs = _state(request)

    def cancelled() -> Any:
        cancel(jobs.client, _get(jobs, job_id))
        return jobs.client.get_run(job_id)

    run = await _run(request, cancelled)
    return to_job(run, request, settings.mlflow_ui_url)
