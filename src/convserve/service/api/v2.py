"""KServe v2 / Open Inference Protocol, REST: health, metadata and inference.

JSON tensors (``name``, ``shape``, ``datatype``, ``data`` flat or nested, row-major), the
optional ``outputs`` selection, errors as ``{"error": "..."}``, and the binary tensor data
extension (``Inference-Header-Content-Length``) that Triton's clients use by default.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from convserve import contract
from convserve.service.api.deps import CatalogDep
from convserve.service.api.errors import errors
from convserve.service.api.v2_schemas import (
    InferRequest,
    InferResponse,
    Live,
    ModelReady,
    Ready,
    ServerMetadata,
    TensorIn,
    V2ModelMetadata,
)
from convserve.service.catalog import Catalog
from convserve.service.engine import Engine
from convserve.service.inference import (
    V2Error,
    check_input,
    find_engine,
    from_bytes,
    from_values,
    infer_cost,
    metadata,
    outputs_wanted,
)
from convserve.service.inference import (
    server_metadata as describe_server,
)
from convserve.training.config import format_validation_error

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

HEADER_LENGTH = "Inference-Header-Content-Length"


def error_response(err: V2Error) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)


_NAME = "A model's name (GET /v1/models)"
_VERSION = "The version being served"
Name = Annotated[str, Path(description=_NAME)]
Version = Annotated[str, Path(description=_VERSION)]
_MODEL_ERRORS = errors(
    404,
    503,
    v2=True,
    e404="A model this server does not serve, or a version of it not served",
    e503="The model is not loaded (yet): with Retry-After while it loads",
)
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON tensors; or, with the Inference-Header-Content-Length header, "
        "that many bytes of JSON followed by the binary tensor data",
        "content": {
            "application/json": {
                "schema": InferRequest.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                ),
                "example": InferRequest.model_config["json_schema_extra"]["examples"][0],  # type: ignore[index]
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "example": "(JSON header, then the binary tensor data)",
            },
        },
    }
}


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    """The server's name, version and protocol extensions (KServe v2)."""
    return describe_server(["binary_tensor_data"])


@router.get("/health/live", summary="Server live", response_model=Live)
async def live() -> dict[str, bool]:
    """Always live while the process answers (KServe v2 liveness)."""
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Server ready (200 when ready, 400 when not)",
    response_model=Ready,
    responses={400: {"model": Ready, "description": "No model loaded yet"}},
)
async def ready(catalog: CatalogDep) -> Response:
    """200 once the default model is loaded; 400 before that, as the protocol says."""
    is_ready = catalog.default.engine is not None
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 400)


def add_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Put the infer request's schema into the OpenAPI components: the infer routes read
    their body themselves (JSON or binary), so FastAPI does not see the model."""
    schema = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components["InferRequest"] = schema
    return openapi


def _ready(engine: Engine) -> dict[str, Any]:
    return {"name": engine.model.source.name, "ready": True}


@router.get(
    "/models/{name}",
    summary="Model metadata",
    response_model=V2ModelMetadata,
    responses=_MODEL_ERRORS,
)
async def model_metadata(name: Name, catalog: CatalogDep) -> Any:
    """The input (``image``) and outputs (``probabilities``, ``features.<block>``) with their
    datatypes and shapes."""
    return metadata(find_engine(catalog, name, None))


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata",
    response_model=V2ModelMetadata,
    responses=_MODEL_ERRORS,
)
async def version_metadata(name: Name, version: Version, catalog: CatalogDep) -> Any:
    """As the model's metadata, for the version being served."""
    return metadata(find_engine(catalog, name, version))


@router.get(
    "/models/{name}/ready",
    summary="Model ready",
    response_model=ModelReady,
    responses=_MODEL_ERRORS,
)
async def model_ready(name: Name, catalog: CatalogDep) -> Any:
    """Whether the model is loaded and answers."""
    return _ready(find_engine(catalog, name, None))


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model version ready",
    response_model=ModelReady,
    responses=_MODEL_ERRORS,
)
async def version_ready(name: Name, version: Version, catalog: CatalogDep) -> Any:
    """Whether this version is loaded and answers."""
    return _ready(find_engine(catalog, name, version))


def _infer_doc(**path: str) -> dict[str, Any]:
    """The infer routes' OpenAPI. They are served directly (``Service.serve_directly``: their
    endpoints take only the request), so their path parameters are declared here, as FastAPI
    declares a ``Path`` parameter."""
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": description,
            "schema": {"type": "string", "title": name.title(), "description": description},
        }
        for name, description in path.items()
    ]
    return {
        "response_model": InferResponse,
        "responses": {
            **_MODEL_ERRORS,
            **errors(
                400,
                503,
                v2=True,
                e400="Not JSON, a wrong input name, datatype or shape",
                e503="No model loaded yet, or busy: heavy requests over "
                "CONVSERVE_ADMISSION_BUDGET are being answered (with Retry-After)",
            ),
        },
        "openapi_extra": {**_INFER_BODY, "parameters": parameters},
    }


@router.post("/models/{name}/infer", summary="Inference", **_infer_doc(name=_NAME))
async def infer(request: Request) -> Response:
    """One FP32 input ``image`` ``[N, C, H, W]`` with values in [0, 1]; every output unless
    ``outputs`` names some. JSON tensors, or binary ones with the binary tensor data extension
    (what Triton's clients send by default). The champion answers, or with the model's canary
    share its challenger (``model_version`` says which)."""
    catalog: Catalog = request.app.state.catalog
    engine, challenger = catalog.route(request.path_params["name"])
    return await _infer(engine, request, challenger)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference on a version",
    **_infer_doc(name=_NAME, version=_VERSION),
)
async def infer_version(request: Request) -> Response:
    """As inference, on the version being served (404 for another one)."""
    catalog: Catalog = request.app.state.catalog
    name, version = request.path_params["name"], request.path_params["version"]
    return await _infer(find_engine(catalog, name, version), request)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON and the binary tensor data after it (a view: the tensors are not copied)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise V2Error(400, f"{HEADER_LENGTH} must be an integer") from None
    if not 0 <= n <= len(body):
        raise V2Error(400, f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def _parse(text: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise V2Error(400, f"the request body is not JSON: {err}") from None
    except ValidationError as err:
        problems = format_validation_error(err).replace("\n", "; ")
        raise V2Error(400, f"invalid inference request: {problems}") from None


def _input_array(engine: Engine, tensor: TensorIn, binary: memoryview) -> np.ndarray:
    dtype = check_input(engine, tensor.name, tensor.datatype, tensor.shape)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:  # from_bytes checks the size against the shape
        if not isinstance(size, int) or not 0 <= size <= len(binary):
            raise V2Error(
                400, f"binary_data_size {size} does not fit the {len(binary)} bytes after the JSON"
            )
        return from_bytes(binary[:size], dtype, tensor.datatype, tensor.shape)
    if tensor.data is None:
        raise V2Error(400, "the input has neither data nor binary_data_size")
    return from_values(tensor.data, tensor.shape)


INLINE_JSON_BYTES = 64 * 1024  # a request's JSON parsed on the event loop; larger: off it


async def _infer(engine: Engine, request: Request, challenger: Engine | None = None) -> Response:
    state = request.app.state
    heavy_pool = state.decoder.heavy
    text, binary = _split(await request.body(), request.headers.get(HEADER_LENGTH))
    if len(text) > INLINE_JSON_BYTES:  # a large JSON tensor: parsed off the event loop
        req = await asyncio.get_running_loop().run_in_executor(heavy_pool, _parse, text)
    else:
        req = _parse(text)
    if len(req.inputs) != 1:
        raise V2Error(
            400, f"expected exactly one input ({contract.INPUT!r}), got {len(req.inputs)}"
        )
    wanted = outputs_wanted(engine, [o.name for o in req.outputs or []])
    as_binary = {o.name for o in req.outputs or [] if o.parameters.get("binary_data")}
    if req.parameters.get("binary_data_output"):
        as_binary = set(wanted)
    batch = req.inputs[0].shape[0] if req.inputs[0].shape else 1
    cost, what = infer_cost(engine, batch, wanted, as_binary == set(wanted))
    async with state.admission.admitted(cost, what) as heavy:
        if heavy:
            images = await asyncio.get_running_loop().run_in_executor(
                heavy_pool, _input_array, engine, req.inputs[0], binary
            )
        else:
            images = _input_array(engine, req.inputs[0], binary)
        result = await engine.infer(images, wanted, heavy_pool if heavy else None)
        if heavy:
            response = await asyncio.get_running_loop().run_in_executor(
                heavy_pool, _answer, engine, req, wanted, as_binary, result
            )
        else:
            response = _answer(engine, req, wanted, as_binary, result)
    probs = result.get(contract.PROBABILITIES)
    return state.catalog.shadow_after(response, engine, challenger, images, probs)


def _answer(
    engine: Engine,
    req: InferRequest,
    wanted: list[str],
    as_binary: set[str],
    result: dict[str, np.ndarray],
) -> Response:
    model = engine.model
    outputs, blobs = [], []
    for name in wanted:
        array = np.ascontiguousarray(result[name], dtype=np.float32)
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if name in as_binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": model.source.name,
        "model_version": model.source.version,
        "outputs": outputs,
    }
    if req.id is not None:
        body["id"] = req.id
    header = json.dumps(body).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
