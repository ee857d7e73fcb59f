"""``POST /predict``: class probabilities and, on request, feature maps."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, HTTPException, Query, Request, Response, UploadFile

from convserve import contract
from convserve.service import features
from convserve.service.api.deps import DecoderDep, EngineDep, MetricsDep, SettingsDep
from convserve.service.api.errors import errors
from convserve.service.decoding import Decoder, DecoderBusy
from convserve.service.fitting import FitReport
from convserve.service.imaging import ImageError
from convserve.service.metrics import Metrics
from convserve.service.model import LoadedModel
from convserve.service.schemas import (
    ClassScore,
    FittedInput,
    ModelRef,
    Prediction,
    PredictResponse,
    Timing,
)
from convserve.service.settings import Settings

router = APIRouter(tags=["predict"])


def model_ref(model: LoadedModel) -> ModelRef:
    s = model.source
    return ModelRef(name=s.name, version=s.version, alias=s.alias, run_id=s.run_id)


def requested_blocks(model: LoadedModel, feature_maps: str | None) -> list[str]:
    if not feature_maps:
        return []
    if feature_maps.strip() == "all":
        return model.blocks
    names = [n.strip() for n in feature_maps.split(",") if n.strip()]
    unknown = [n for n in names if n not in model.blocks]
    if unknown:
        raise HTTPException(
            422, f"unknown block(s) {', '.join(unknown)}; valid: {', '.join(model.blocks)} or 'all'"
        )
    return names


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify one image (`file`) or several (`files`)",
    responses=errors(
        400,
        413,
        422,
        503,
        e400="A malformed multipart body",
        e422="Not a usable image (empty, not an image, truncated or corrupt, a format not "
        "accepted), an unknown block, or feature maps too large for one answer",
        e503="No model loaded yet, or CONVSERVE_MAX_LARGE_DECODES large images are being "
        "decoded already (with Retry-After)",
    ),
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    # a plain-text PGM (netpbm) image: 3x3 grey, a vertical stroke
                    "example": {"file": "P2 3 3 255 0 255 0 0 255 0 0 255 0"},
                }
            }
        }
    },
)
async def predict(
    request: Request,
    engine: EngineDep,
    decoder: DecoderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile | None, File(description="One image")] = None,
    files: Annotated[
        list[UploadFile] | None, File(description="Several images, answered in order")
    ] = None,
    top_k: Annotated[
        int | None,
        Query(ge=1, description="How many top classes to list (default CONVSERVE_DEFAULT_TOP_K)"),
    ] = None,
    feature_maps: Annotated[
        str | None, Query(description="'all' or comma-separated block names, e.g. block1,block2")
    ] = None,
    fit: Annotated[
        Literal["model", "none"],
        Query(
            description="model: fit the image as the model's training images were (for digit "
            "models: crop to the ink, scale to the data set's box, centre by mass, invert a "
            "light background); none: stretch the whole image to the input size"
        ),
    ] = "model",
    format: Annotated[
        Literal["png", "array", "stats"],
        Query(
            description="Feature maps as a tiled PNG grid per block, raw arrays, or per-channel "
            "mean and max"
        ),
    ] = "png",
) -> Response:
    """Images in PNG, JPEG, WebP, BMP, GIF (first frame), TIFF or PNM, any colour mode;
    converted to the model's channels, EXIF orientation applied, fitted as the model's
    metadata says."""
    start = time.perf_counter()
    uploads = ([file] if file is not None else []) + list(files or [])
    model = engine.model
    blocks = _check_request(uploads, model, feature_maps, format, settings)
    batch, fitted = await _decode_all(uploads, decoder, model, metrics, fit == "model")
    decoded = time.perf_counter()
    result = await engine.infer(
        batch, [contract.PROBABILITIES, *(contract.feature_output(b) for b in blocks)]
    )
    inferred = time.perf_counter()
    k = min(top_k or settings.default_top_k, len(model.labels))
    predictions = [
        _prediction(upload.filename, fitted[i], i, result, model, blocks, k, format)
        for i, upload in enumerate(uploads)
    ]
    end = time.perf_counter()
    body = PredictResponse(
        request_id=getattr(request.state, "request_id", None) or uuid.uuid4().hex,
        model=model_ref(model),
        predictions=predictions,
        time=Timing(
            decode_ms=(decoded - start) * 1e3,
            inference_ms=(inferred - decoded) * 1e3,
            total_ms=(end - start) * 1e3,
        ),
    )
    # Already a validated model: serialise once instead of FastAPI's second validation.
    return Response(body.model_dump_json(exclude_none=True), media_type="application/json")


def _check_request(
    uploads: list[UploadFile],
    model: LoadedModel,
    feature_maps: str | None,
    format: str,
    settings: Settings,
) -> list[str]:
    """Refuse what cannot be answered before any image is decoded; the blocks asked for."""
    if not uploads:
        raise HTTPException(
            422, "send one image as the multipart field `file`, or several as `files`"
        )
    if len(uploads) > settings.max_files:
        raise HTTPException(
            413,
            f"{len(uploads)} images in one request; the limit is "
            f"{settings.max_files} (CONVSERVE_MAX_FILES)",
        )
    blocks = requested_blocks(model, feature_maps)
    shapes = [model.feature_shapes[b] for b in blocks]
    size = features.estimate_bytes(shapes, format, len(uploads))
    if size > settings.max_response_bytes:
        raise HTTPException(
            422,
            f"the feature maps would make a response of about "
            f"{size / 1e6:.1f} MB (limit {settings.max_response_bytes / 1e6:.1f}"
            " MB): ask for fewer blocks (feature_maps=block1), fewer images, or "
            "format=png or format=stats",
        )
    return blocks


async def _decode_all(
    uploads: list[UploadFile], decoder: Decoder, model: LoadedModel, metrics: Metrics, fit: bool
) -> tuple[np.ndarray, list[FitReport]]:
    """Every upload as the model's input, stacked ``[N, C, H, W]``, and how each was fitted;
    a bad one answers 4xx, and 503 when large decodes are all busy."""
    arrays, reports = [], []
    for upload in uploads:
        data = await upload.read()
        try:
            array, report = await decoder.prepare(
                data, model.channels, model.height, model.width, model.meta.fit if fit else None
            )
        except ImageError as err:
            metrics.rejected.labels("image").inc()
            raise HTTPException(err.status, f"{upload.filename or 'upload'}: {err}") from None
        except DecoderBusy:
            metrics.rejected.labels("busy").inc()
            raise HTTPException(
                503,
                f"{decoder.slots_total} large images are being decoded already "
                "(CONVSERVE_MAX_LARGE_DECODES); try again in a second",
                headers={"Retry-After": "1"},
            ) from None
        arrays.append(array)
        reports.append(report)
    return np.stack(arrays), reports


def _prediction(
    filename: str | None,
    fitted: FitReport,
    i: int,
    result: dict[str, np.ndarray],
    model: LoadedModel,
    blocks: list[str],
    k: int,
    format: str,
) -> Prediction:
    probs = result[contract.PROBABILITIES][i]
    order = np.argsort(-probs)[:k]
    fmaps = {b: features.render(result[contract.feature_output(b)][i], format) for b in blocks}
    return Prediction(
        filename=filename,
        input=FittedInput(
            original=fitted.original,
            format=fitted.format,
            fit=fitted.method,  # type: ignore[arg-type]
            steps=fitted.steps,
        ),
        top_k=[
            ClassScore(label=model.labels[j], index=int(j), probability=float(probs[j]))
            for j in order
        ],
        probabilities={label: float(p) for label, p in zip(model.labels, probs, strict=True)},
        feature_maps=fmaps or None,
    )
