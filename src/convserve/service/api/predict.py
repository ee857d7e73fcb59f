"""``POST /predict``: class probabilities and, on request, feature maps.

This is the route under load, so it reads its request itself: the query through one pydantic
model (``PredictQuery``), the multipart body with ``service/multipart.py``, the service's parts
from ``app.state``, and it writes its answer as one JSON serialisation of plain values. FastAPI's
per-request parameter and dependency resolution cost more than the model's inference here. The
OpenAPI description is generated from the same ``PredictQuery`` and ``PredictResponse`` models,
so the documentation stays what the code accepts and answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_json

from convserve import contract
from convserve.service import admission, explain, features, multipart
from convserve.service.api.deps import new_request_id
from convserve.service.api.errors import errors
from convserve.service.decoding import Decoder, DecoderBusy
from convserve.service.fitting import FitReport
from convserve.service.imaging import ImageError
from convserve.service.metrics import Metrics
from convserve.service.model import LoadedModel
from convserve.service.multipart import Part
from convserve.service.schemas import PredictResponse
from convserve.service.settings import Settings

router = APIRouter(tags=["predict"])

SEND_IMAGES = "send one image as the multipart field `file`, or several as `files`"
MAX_OTHER_FIELDS = 16  # multipart parts besides the images, ignored but counted
MAX_EXPLAINED = 4  # images per request with explain=occlusion: each costs ~169 inferences


class PredictQuery(BaseModel):
    """The query parameters of ``POST /predict``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str | None = Field(
        None,
        description="Which model answers (GET /v1/models lists them); default: the default "
        "model (CONVSERVE_MODEL_URI). Its champion answers, or with the model's canary share "
        "its challenger (the answer's model.alias says which)",
    )
    top_k: int | None = Field(
        None, ge=1, description="How many top classes to list (default CONVSERVE_DEFAULT_TOP_K)"
    )
    feature_maps: str | None = Field(
        None, description="'all' or comma-separated block names, e.g. block1,block2"
    )
    fit: Literal["model", "none"] = Field(
        "model",
        description="model: fit the image as the model's training images were (for digit "
        "models: crop to the ink, scale to the data set's box, centre by mass, invert a light "
        "background); none: stretch the whole image to the input size",
    )
    explain: Literal["none", "occlusion"] = Field(
        "none",
        description="occlusion: for the top class, a heat map of how much its probability "
        f"drops when each region of the input is hidden (at most {MAX_EXPLAINED} images a "
        "request; one batch of occluded copies per image)",
    )
    return_input: bool = Field(
        False,
        description="Include the model's input as it saw it (after fitting) as a PNG "
        "(input.png); always included with explain=occlusion",
    )
    format: Literal["png", "array", "stats"] = Field(
        "png",
        description="Feature maps as a tiled PNG grid per block, raw arrays, or per-channel "
        "mean and max",
    )


def _query_parameters() -> list[dict[str, Any]]:
    parameters = []
    for name, schema in PredictQuery.model_json_schema()["properties"].items():
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": schema,
                "description": schema["description"],
            }
        )
    return parameters


_UPLOAD = {"type": "string", "contentMediaType": "application/octet-stream"}
_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {**_UPLOAD, "description": "One image"},
                    "files": {
                        "type": "array",
                        "items": _UPLOAD,
                        "description": "Several images, answered in order",
                    },
                },
            },
            # a plain-text PGM (netpbm) image: 3x3 grey, a vertical stroke
            "example": {"file": "P2 3 3 255 0 255 0 0 255 0 0 255 0"},
        }
    },
}


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
        404,
        413,
        422,
        503,
        e400="A malformed multipart body",
        e404="A model this server does not serve (`model`)",
        e422="Not a usable image (empty, not an image, truncated or corrupt, a format not "
        "accepted), an unknown block, invalid parameters, or feature maps too large for one "
        "answer",
        e503="The model is not loaded yet (with Retry-After while it loads), "
        "CONVSERVE_MAX_LARGE_DECODES large images are being decoded already, or busy: heavy "
        "requests over CONVSERVE_ADMISSION_BUDGET are being answered (with Retry-After)",
    ),
    openapi_extra={"parameters": _query_parameters(), "requestBody": _BODY},
)
async def predict(request: Request) -> Response:
    """Images in PNG, JPEG, WebP, BMP, GIF (first frame), TIFF or PNM, any colour mode;
    converted to the model's channels, EXIF orientation applied, fitted as the model's
    metadata says."""
    start = time.perf_counter()
    state = request.app.state
    settings: Settings = state.settings
    query = _query(request)
    engine, challenger = state.catalog.route(query.model)  # NotServed: app.py answers
    model = engine.model
    uploads = await _uploads(request, settings)
    blocks = _check_request(uploads, model, query, settings)
    cost, what = _cost(uploads, model, query, blocks)
    async with state.admission.admitted(cost, what) as heavy:
        fit = query.fit == "model"
        if heavy:  # decoding and encoding in the heavy thread, off the event loop
            batch, fitted = await asyncio.get_running_loop().run_in_executor(
                state.decoder.heavy,
                _decode_all_now,
                uploads,
                state.decoder,
                model,
                state.metrics,
                fit,
            )
        else:
            batch, fitted = await _decode_all(uploads, state.decoder, model, state.metrics, fit)
        times = [start, time.perf_counter()]
        pool = state.decoder.heavy if heavy else None
        result = await engine.infer(
            batch, [contract.PROBABILITIES, *(contract.feature_output(b) for b in blocks)], pool
        )
        times.append(time.perf_counter())
        explanations = None
        if query.explain == "occlusion":
            probs = result[contract.PROBABILITIES]
            explanations = [
                await _occlusion(engine, model, batch[i], probs[i], pool) for i in range(len(batch))
            ]
        times.append(time.perf_counter())
        answer = Answer(request, uploads, fitted, batch, result, model, blocks, query, settings)
        if heavy:
            pieces = await asyncio.get_running_loop().run_in_executor(
                state.decoder.heavy, answer.json, explanations, times, True
            )
            # sent piece by piece, never joined: each waits for the socket to drain while
            # the event loop answers other requests
            size = str(sum(map(len, pieces)))
            response: Response = StreamingResponse(
                _pieces(pieces), media_type="application/json", headers={"content-length": size}
            )
        else:
            body = b"".join(answer.json(explanations, times))
            response = Response(body, media_type="application/json")
    probs = result[contract.PROBABILITIES]
    return state.catalog.shadow_after(response, engine, challenger, batch, probs)


def _cost(
    uploads: list[Part], model: LoadedModel, query: PredictQuery, blocks: list[str]
) -> tuple[int, str]:
    """The request's cost in admission units (``admission.py``), and what it asks, in words."""
    n = len(uploads)
    shapes = [model.feature_shapes[b] for b in blocks]
    answer = features.estimate_bytes(shapes, query.format, n) + n * 40 * len(model.labels)
    runs = 1
    if query.explain == "occlusion":
        runs += explain.occlusions(model.height, model.width)
        answer += n * model.height * model.width * 10  # the heat map as JSON
    if query.return_input or query.explain != "none":
        answer += n * (model.channels * model.height * model.width * 4 // 3 + 200)
    if blocks:  # rendering maps (PNG tiles most of all) costs more than its bytes say
        answer += len(blocks) * n * admission.BYTES_PER_UNIT * 4
    what = f"{n} image{'s' * (n != 1)}"
    if blocks:
        what += f", feature maps of {len(blocks)} block{'s' * (len(blocks) != 1)}"
    if query.explain != "none":
        what += f", explain={query.explain}"
    cost = admission.request_cost(n, runs, answer)
    if blocks or query.return_input or query.explain != "none":  # PNG or array encoding:
        cost = max(cost, admission.LIGHT_COST + 1)  # never on the event loop
    return cost, what


class Answer:
    """What ``POST /predict`` answers, built from the model's outputs as JSON."""

    def __init__(
        self,
        request: Request,
        uploads: list[Part],
        fitted: list[FitReport],
        batch: np.ndarray,
        result: dict[str, np.ndarray],
        model: LoadedModel,
        blocks: list[str],
        query: PredictQuery,
        settings: Settings,
    ) -> None:
        self.request_id = request.scope.get("state", {}).get("request_id") or new_request_id()
        self.uploads, self.fitted, self.batch, self.result = uploads, fitted, batch, result
        self.model, self.blocks, self.query = model, blocks, query
        self.k = min(query.top_k or settings.default_top_k, len(model.labels))

    def json(
        self,
        explanations: list[dict[str, Any]] | None,
        times: list[float],
        yield_gil: bool = False,
    ) -> list[bytes]:
        """The JSON in pieces: the head, each image's answer, the tail. ``times``: the
        request's start, then when decoding, inference and explaining ended; ``yield_gil``
        (the heavy thread): the GIL handed to the event loop after each image."""
        query = self.query

        def one(i: int, upload: Part) -> bytes:
            answer = _prediction(
                upload.filename, self.fitted[i], i, self.result, self.model, self.blocks,
                self.k, query.format,
            )  # fmt: skip
            if explanations is not None:
                answer["explanation"] = explanations[i]
            if query.return_input or query.explain != "none":
                answer["input"]["png"] = explain.input_png(self.batch[i])
            text = to_json(answer)
            if yield_gil:
                time.sleep(0)  # the GIL to the event loop between two images' answers
            return text

        start, decoded, inferred, explained = times
        head = {"request_id": self.request_id, "model": self.model.reference}
        took = {
            "decode_ms": (decoded - start) * 1e3,
            "inference_ms": (inferred - decoded) * 1e3,
            **({"explain_ms": (explained - inferred) * 1e3} if query.explain != "none" else {}),
            "total_ms": (time.perf_counter() - start) * 1e3,
        }
        # built and serialised one image at a time: only one image's values are held as
        # Python objects at once, and another thread (the event loop) may run between them
        pieces = [to_json(head)[:-1] + b',"predictions":[']
        pieces += [b"," * (i > 0) + one(i, upload) for i, upload in enumerate(self.uploads)]
        pieces.append(b'],"time":' + to_json(took) + b"}")
        return pieces


async def _pieces(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


DEFAULT_QUERY = PredictQuery()


def _query(request: Request) -> PredictQuery:
    if not request.scope["query_string"]:
        return DEFAULT_QUERY
    try:
        return PredictQuery.model_validate(dict(request.query_params))
    except ValidationError as err:
        raise RequestValidationError(
            [{**e, "loc": ("query", *e["loc"])} for e in err.errors()]
        ) from None


async def _uploads(request: Request, settings: Settings) -> list[Part]:
    """The ``file`` and ``files`` parts, in order; other fields are ignored."""
    body = await request.body()
    if not body:
        return []
    try:
        parts = multipart.parse(
            body,
            multipart.boundary(request.headers.get("content-type")),
            max_parts=settings.max_files + MAX_OTHER_FIELDS,
        )
    except multipart.NotMultipart as err:
        raise HTTPException(422, f"{SEND_IMAGES} ({err})") from None
    except multipart.TooManyParts as err:
        raise HTTPException(
            413,
            f"{err}: at most {settings.max_files} images (CONVSERVE_MAX_FILES) and "
            f"{MAX_OTHER_FIELDS} other fields",
        ) from None
    except multipart.MultipartError as err:
        raise HTTPException(400, f"malformed multipart body: {err}") from None
    uploads = [p for p in parts if p.name in ("file", "files")]
    if any(p.filename is None for p in uploads):
        raise HTTPException(
            422, "`file` and `files` must be file uploads (multipart parts with a filename)"
        )
    return uploads


def _check_request(
    uploads: list[Part], model: LoadedModel, query: PredictQuery, settings: Settings
) -> list[str]:
    """Refuse what cannot be answered before any image is decoded; the blocks asked for."""
    if not uploads:
        raise HTTPException(422, SEND_IMAGES)
    if len(uploads) > settings.max_files:
        raise HTTPException(
            413,
            f"{len(uploads)} images in one request; the limit is "
            f"{settings.max_files} (CONVSERVE_MAX_FILES)",
        )
    if query.explain != "none" and len(uploads) > MAX_EXPLAINED:
        raise HTTPException(
            413,
            f"explain=occlusion explains at most {MAX_EXPLAINED} images a request "
            f"({len(uploads)} sent)",
        )
    blocks = requested_blocks(model, query.feature_maps)
    shapes = [model.feature_shapes[b] for b in blocks]
    size = features.estimate_bytes(shapes, query.format, len(uploads))
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
    uploads: list[Part], decoder: Decoder, model: LoadedModel, metrics: Metrics, fit: bool
) -> tuple[np.ndarray, list[FitReport]]:
    """Every upload as the model's input, stacked ``[N, C, H, W]``, and how each was fitted;
    a bad one answers 4xx, and 503 when large decodes are all busy."""
    arrays, reports = [], []
    for upload in uploads:
        try:
            array, report = await decoder.prepare(
                upload.data,
                model.channels,
                model.height,
                model.width,
                model.meta.fit if fit else None,
            )
        except ImageError as err:
            raise _unusable(upload, err, metrics) from None
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
    return (arrays[0][None] if len(arrays) == 1 else np.stack(arrays)), reports


def _unusable(upload: Part, err: ImageError, metrics: Metrics) -> HTTPException:
    metrics.rejected.labels("image").inc()
    return HTTPException(err.status, f"{upload.filename or 'upload'}: {err}")


def _decode_all_now(
    uploads: list[Part], decoder: Decoder, model: LoadedModel, metrics: Metrics, fit: bool
) -> tuple[np.ndarray, list[FitReport]]:
    """``_decode_all`` in the calling thread (the heavy one): every upload decoded here."""
    arrays, reports = [], []
    for upload in uploads:
        try:
            array, report = decoder.prepare_now(
                upload.data, model.channels, model.height, model.width,
                model.meta.fit if fit else None,
            )  # fmt: skip
        except ImageError as err:
            raise _unusable(upload, err, metrics) from None
        arrays.append(array)
        reports.append(report)
    return np.stack(arrays), reports


async def _occlusion(
    engine: Any,
    model: LoadedModel,
    image: np.ndarray,
    probs: np.ndarray,
    heavy: Executor | None = None,
) -> dict[str, Any]:
    """The top class's occlusion map for one input ``[C, H, W]`` (``service/explain.py``)."""
    index = int(np.argmax(probs))
    patch, stride = explain.patch_and_stride(model.height, model.width)
    baseline = explain.baseline(model.meta)
    copies, corners = explain.occluded(image, patch, stride, baseline)
    occluded = (await engine.infer(copies, [contract.PROBABILITIES], heavy))[contract.PROBABILITIES]
    reference = float(probs[index])
    heat = explain.drop_map(reference, occluded[:, index], corners, patch, *image.shape[1:])
    return {
        "method": "occlusion",
        "label": model.labels[index],
        "index": index,
        "probability": reference,
        "patch": patch,
        "stride": stride,
        "occlusions": len(corners),
        "max_drop": float(heat.max()),
        "heatmap": np.round(heat, 5).tolist(),
    }


def _prediction(
    filename: str | None,
    fitted: FitReport,
    i: int,
    result: dict[str, np.ndarray],
    model: LoadedModel,
    blocks: list[str],
    k: int,
    fmt: str,
) -> dict[str, Any]:
    """One image's answer, shaped as ``schemas.Prediction``."""
    probs = result[contract.PROBABILITIES][i]
    values = probs.tolist()
    labels = model.labels
    order = np.argsort(-probs)[:k].tolist()
    fitted_input: dict[str, Any] = {
        "original": fitted.original,
        "fit": fitted.method,
        "steps": fitted.steps,
    }
    if fitted.format is not None:
        fitted_input["format"] = fitted.format
    answer: dict[str, Any] = {} if filename is None else {"filename": filename}
    answer |= {
        "input": fitted_input,
        "top_k": [{"label": labels[j], "index": j, "probability": values[j]} for j in order],
        "probabilities": dict(zip(labels, values, strict=True)),
    }
    if blocks:
        answer["feature_maps"] = {
            b: features.render_values(result[contract.feature_output(b)][i], fmt) for b in blocks
        }
    return answer
