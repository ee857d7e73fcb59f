"""``/datasets``: upload a labelled image set, read its report, list and delete data sets.
Each is an MLflow run in the ``convserve-datasets`` experiment (``training/uploads.py``)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from convserve.service.api.deps import SettingsDep, TokenDep
from convserve.service.api.errors import errors
from convserve.training import uploads

router = APIRouter(prefix="/datasets", tags=["datasets"])

_EXAMPLE: dict[str, Any] = {
    "id": "f09ebd8c44b4f45c",
    "name": "flowers",
    "classes": {"daisy": 633, "rose": 641, "tulip": 0},
    "images": 1274,
    "sizes": {"500x375": 402, "320x240": 301},
    "modes": {"RGB": 1274},
    "duplicates": [["daisy/12.jpg", "daisy/12 copy.jpg"]],
    "skipped": [{"path": "rose/notes.txt", "reason": "not an image (.txt)"}],
    "too_small": ["tulip"],
    "bytes": 48213504,
    "created": True,
    "run_id": "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
}


class DatasetReport(BaseModel):
    model_config = {"json_schema_extra": {"examples": [_EXAMPLE]}}

    id: str = Field(
        description="SHA-256 of the images kept (16 hex digits): the same images, the same id"
    )
    name: str
    classes: dict[str, int] = Field(description="Images kept per class, in label order")
    images: int
    sizes: dict[str, int] = Field(description="Image sizes (WxH), the 10 most common")
    modes: dict[str, int] = Field(description="PIL colour modes")
    duplicates: list[list[str]] = Field(description="Files with the same bytes: the first is kept")
    skipped: list[dict[str, str]] = Field(
        description="Files that are not images or cannot be decoded, with why (never fatal)"
    )
    too_small: list[str] = Field(
        description=f"Classes with fewer than {uploads.MIN_PER_CLASS} images, too few to split"
    )
    bytes: int = Field(description="Size of the stored images")
    created: bool | None = Field(
        None, description="On upload: false when the same images were stored already"
    )
    run_id: str = Field(description="The MLflow run that holds the data set")


class DatasetPage(BaseModel):
    model_config = {"json_schema_extra": {"examples": [{"datasets": [_EXAMPLE]}]}}

    datasets: list[DatasetReport]


DatasetId = Annotated[str, Path(description="The data set's id, or its name (newest version)")]


@dataclass
class Ingests:
    """Uploads being ingested by this process (``CONVSERVE_MAX_DATASET_INGESTS`` at most)."""

    running: int = 0


async def _call(request: Request, fn: Callable[[], Any]) -> Any:
    """``fn()`` off the event loop, bounded; MLflow failing answers 503 (``backends.py``)."""
    return await request.app.state.jobs.call(fn)


def _client(request: Request) -> Any:
    """The MLflow client; read it in a worker thread (its first use imports MLflow)."""
    return request.app.state.jobs.client


def _report(run: Any, created: bool | None = None) -> DatasetReport:
    return DatasetReport(**uploads.report_of(run), created=created, run_id=run.info.run_id)


@router.post(
    "",
    status_code=201,
    response_model=DatasetReport,
    summary="Upload a labelled image set",
    responses=errors(
        401,
        413,
        422,
        429,
        503,
        e413="The archive, what it unpacks to, its entries, an image's pixels or its "
        "classes exceed a limit; refused at the first entry past it",
        e429="As many data sets as allowed (CONVSERVE_MAX_DATASET_INGESTS) are being "
        "ingested; try again after Retry-After seconds",
        e422="Not a zip or tar archive, a path outside the archive, fewer than two class "
        "folders, or no decodable image; nothing is stored",
        e503="MLflow cannot be reached; nothing is stored",
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "PK... (a zip of class folders: daisy/1.jpg, rose/2.jpg, ...)",
                }
            },
        }
    },
)
async def create_dataset(
    request: Request,
    _: TokenDep,
    settings: SettingsDep,
    name: Annotated[
        str,
        Query(
            min_length=1,
            max_length=100,
            pattern=r"^[\w.-]+$",
            description="What to call it (letters, digits, _ . -)",
        ),
    ],
) -> JSONResponse:
    """The body is the archive itself (zip, or tar optionally gzip/bzip2/xz compressed) of
    class folders: ``class_a/img1.jpg``, ``class_b/img2.png``, ... (one enclosing folder is
    fine). It is streamed to disk, unpacked safely and checked image by image; the report
    says what this upload kept, skipped and duplicated. Answers 201, or 200 when the same
    images were stored already under this name (the id is their content hash; under another
    name they are stored again as that name's version)."""
    ingests = request.app.state.ingests
    if ingests.running >= settings.max_dataset_ingests:
        raise HTTPException(
            429,
            f"{ingests.running} data sets are being ingested by this process (limit "
            f"{settings.max_dataset_ingests}, CONVSERVE_MAX_DATASET_INGESTS); try again later",
            headers={"Retry-After": "10"},
        )
    ingests.running += 1
    try:
        return await _ingest(request, name, settings.dataset_limits())
    finally:
        ingests.running -= 1


async def _ingest(request: Request, name: str, limits: uploads.Limits) -> JSONResponse:
    """The body streamed to a temporary file, then unpacked, checked and stored off the event
    loop; a client that leaves meanwhile leaves nothing behind."""
    with tempfile.TemporaryDirectory(prefix="convserve-upload-") as tmp:
        archive = FilePath(tmp) / "archive"
        size = 0
        with open(archive, "wb") as out:  # the middleware stops it at the size limit
            async for chunk in request.stream():
                size += len(chunk)
                out.write(chunk)
        if size == 0:
            raise HTTPException(422, "send the archive as the request body (zip or tar)")
        try:
            run, report, created = await _call(
                request, lambda: uploads.add(archive, name, _client(request), limits)
            )
        except uploads.DatasetError as err:
            raise HTTPException(err.status, str(err)) from None
    # this upload's report (what it skipped), on the version that holds its images
    answer = DatasetReport(**report.to_dict(), created=created, run_id=run.info.run_id)
    return JSONResponse(answer.model_dump(), status_code=201 if created else 200)


@router.get("", response_model=DatasetPage, summary="Uploaded data sets, newest first")
async def list_datasets(request: Request) -> DatasetPage:
    """Every data set uploaded (``POST /datasets`` or ``convserve data add``), with its
    report."""
    runs = await _call(request, lambda: uploads.listing(_client(request)))
    return DatasetPage(datasets=[_report(run) for run in runs])


@router.get(
    "/{dataset}",
    response_model=DatasetReport,
    summary="One data set's report",
    responses=errors(404, e404="No data set with this id or name"),
)
async def get_dataset(dataset: DatasetId, request: Request) -> DatasetReport:
    """Its classes and counts, image sizes and modes, duplicates, skipped files and classes
    too small to split. Train on it with ``data: {name: dataset, id: ID}``."""
    run = await _call(request, lambda: uploads.find(_client(request), dataset))
    if run is None:
        raise HTTPException(404, f"no data set {dataset}")
    return _report(run)


@router.delete(
    "/{dataset}",
    response_model=DatasetReport,
    summary="Delete a data set",
    responses=errors(401, 404, e404="No data set with this id or name"),
)
async def delete_dataset(dataset: DatasetId, request: Request, _: TokenDep) -> DatasetReport:
    """Its MLflow run is deleted (MLflow's garbage collection removes the files). Runs that
    trained on it keep their record of it as an input; workers' caches keep their copy."""
    run = await _call(request, lambda: uploads.delete(_client(request), dataset))
    if run is None:
        raise HTTPException(404, f"no data set {dataset}")
    return _report(run)
