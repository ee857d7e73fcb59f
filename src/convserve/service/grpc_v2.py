"""KServe v2 (Open Inference Protocol) over gRPC: the ``inference.GRPCInferenceService`` that
Triton and KServe serve, for clients such as ``tritonclient.grpc`` and KServe's
``InferenceGRPCClient``.

Off unless ``CONVSERVE_GRPC_PORT`` is set. Each worker process serves it on that port beside
HTTP, in the same event loop and on the same engine (so gRPC and HTTP requests share batches),
bound with ``SO_REUSEPORT`` so that the kernel spreads connections over the processes as it
does for HTTP. The answers are the HTTP v2 route's (``inference.py``): the same checks, the
same messages, with the HTTP status mapped to a gRPC code. As over HTTP, the inference routes
need no token; a message larger than ``CONVSERVE_MAX_UPLOAD_BYTES`` is refused
(``RESOURCE_EXHAUSTED``); every call is counted in ``convserve_http_requests`` and
``convserve_http_request_duration_seconds`` with its method path as the route, ``GRPC`` as
the method and the status code's name as the status.

The messages are described here, in this module, from the protocol's published field numbers
and types, and built at import into a private descriptor pool: nothing is generated, and no
``protoc`` is needed to build or run it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import grpc
import numpy as np
from fastapi import HTTPException
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from convserve.service import inference as v2
from convserve.service.admission import Admission
from convserve.service.catalog import Catalog, NotServed
from convserve.service.inference import V2Error
from convserve.service.metrics import Metrics
from convserve.service.settings import Settings

log = logging.getLogger(__name__)

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

# Each message: its fields as "[repeated|oneof:ONEOF] TYPE name = number", TYPE a scalar, a
# message or map<MESSAGE> (string keys).
_MESSAGES: dict[str, list[str]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": ["bool live = 1"],
    "ServerReadyRequest": [],
    "ServerReadyResponse": ["bool ready = 1"],
    "ModelReadyRequest": ["string name = 1", "string version = 2"],
    "ModelReadyResponse": ["bool ready = 1"],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [
        "string name = 1",
        "string version = 2",
        "repeated string extensions = 3",
    ],
    "ModelMetadataRequest": ["string name = 1", "string version = 2"],
    "TensorMetadata": ["string name = 1", "string datatype = 2", "repeated int64 shape = 3"],
    "ModelMetadataResponse": [
        "string name = 1",
        "repeated string versions = 2",
        "string platform = 3",
        "repeated TensorMetadata inputs = 4",
        "repeated TensorMetadata outputs = 5",
    ],
    "InferParameter": [
        "oneof:parameter_choice bool bool_param = 1",
        "oneof:parameter_choice int64 int64_param = 2",
        "oneof:parameter_choice string string_param = 3",
    ],
    "InferTensorContents": [
        "repeated bool bool_contents = 1",
        "repeated int32 int_contents = 2",
        "repeated int64 int64_contents = 3",
        "repeated uint32 uint_contents = 4",
        "repeated uint64 uint64_contents = 5",
        "repeated float fp32_contents = 6",
        "repeated double fp64_contents = 7",
        "repeated bytes bytes_contents = 8",
    ],
    "InferInputTensor": [
        "string name = 1",
        "string datatype = 2",
        "repeated int64 shape = 3",
        "map<InferParameter> parameters = 4",
        "InferTensorContents contents = 5",
    ],
    "InferRequestedOutputTensor": ["string name = 1", "map<InferParameter> parameters = 2"],
    "ModelInferRequest": [
        "string model_name = 1",
        "string model_version = 2",
        "string id = 3",
        "map<InferParameter> parameters = 4",
        "repeated InferInputTensor inputs = 5",
        "repeated InferRequestedOutputTensor outputs = 6",
        "repeated bytes raw_input_contents = 7",
    ],
    "InferOutputTensor": [
        "string name = 1",
        "string datatype = 2",
        "repeated int64 shape = 3",
        "map<InferParameter> parameters = 4",
        "InferTensorContents contents = 5",
    ],
    "ModelInferResponse": [
        "string model_name = 1",
        "string model_version = 2",
        "string id = 3",
        "map<InferParameter> parameters = 4",
        "repeated InferOutputTensor outputs = 5",
        "repeated bytes raw_output_contents = 6",
    ],
}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
}


def _add_field(message: Any, spec: str) -> None:
    words, number = spec.split(" = ")
    *kind, type_name, name = words.split()
    field = message.field.add(name=name, number=int(number), label=_F.LABEL_OPTIONAL)
    if type_name.startswith("map<"):  # repeated entries of a string key and a message value
        entry = message.nested_type.add(name=f"{name.title().replace('_', '')}Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
        value = entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL)
        value.type, value.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{type_name[4:-1]}"
        field.label, field.type = _F.LABEL_REPEATED, _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{message.name}.{entry.name}"
        return
    if kind == ["repeated"]:
        field.label = _F.LABEL_REPEATED
    elif kind and kind[0].startswith("oneof:"):
        oneof = kind[0].removeprefix("oneof:")
        names = [o.name for o in message.oneof_decl]
        if oneof not in names:
            message.oneof_decl.add(name=oneof)
            names.append(oneof)
        field.oneof_index = names.index(oneof)
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{type_name}"


def _build() -> dict[str, Any]:
    """The message classes, by name."""
    file = descriptor_pb2.FileDescriptorProto(
        name="convserve/kserve_v2.proto", package=PACKAGE, syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for spec in fields:
            _add_field(message, spec)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in _MESSAGES
    }


MESSAGES = _build()

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class InferenceService:
    """The six calls of the protocol, answered from the served set's engines."""

    def __init__(self, catalog: Catalog, admission: Admission, heavy_pool: Executor) -> None:
        self.catalog = catalog
        self.admission, self.heavy_pool = admission, heavy_pool

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return MESSAGES["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return MESSAGES["ServerReadyResponse"](ready=self.catalog.default.engine is not None)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        v2.find_engine(self.catalog, request.name, request.version)
        return MESSAGES["ModelReadyResponse"](ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return MESSAGES["ServerMetadataResponse"](**v2.server_metadata([]))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return MESSAGES["ModelMetadataResponse"](
            **v2.metadata(v2.find_engine(self.catalog, request.name, request.version))
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        engine = v2.find_engine(self.catalog, request.model_name, request.model_version)
        wanted = v2.outputs_wanted(engine, [o.name for o in request.outputs])
        shape = list(request.inputs[0].shape) if len(request.inputs) == 1 else []
        cost, what = v2.infer_cost(engine, shape[0] if shape else 1, wanted, binary=True)
        try:
            async with self.admission.admitted(cost, what) as heavy:
                images = _images(engine, request)
                pool = self.heavy_pool if heavy else None
                result = await engine.infer(images, wanted, pool)
        except HTTPException as err:  # over the admission budget: UNAVAILABLE
            raise V2Error(err.status_code, str(err.detail)) from None
        source = engine.model.source
        answer = MESSAGES["ModelInferResponse"](
            model_name=source.name, model_version=source.version or "", id=request.id
        )
        for name in wanted:
            array = np.ascontiguousarray(result[name], dtype=np.float32)
            answer.outputs.add(name=name, datatype="FP32", shape=array.shape)
            answer.raw_output_contents.append(array.tobytes())
        return answer


def _images(engine: Any, request: Any) -> np.ndarray:
    """The one input tensor, from ``raw_input_contents`` or from its typed contents."""
    if len(request.inputs) != 1:
        raise V2Error(400, f"expected exactly one input ('image'), got {len(request.inputs)}")
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    dtype = v2.check_input(engine, tensor.name, tensor.datatype, shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise V2Error(400, "raw_input_contents must hold one entry per input (one)")
        return v2.from_bytes(request.raw_input_contents[0], dtype, tensor.datatype, shape)
    contents = tensor.contents
    values = contents.fp32_contents if tensor.datatype == "FP32" else contents.fp64_contents
    if tensor.datatype == "FP16" or not values:
        raise V2Error(400, f"the input has no {tensor.datatype} contents; send raw_input_contents")
    return v2.from_values(values, shape)


def _method(name: str, call: Handler, metrics: Metrics) -> grpc.RpcMethodHandler:
    """``call`` with its errors answered as gRPC status codes and counted in the metrics."""
    route = f"/{SERVICE}/{name}"
    request_type, response_type = MESSAGES[f"{name}Request"], MESSAGES[f"{name}Response"]

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await call(request, context)
        except (V2Error, NotServed) as err:
            code = _CODES.get(err.status, grpc.StatusCode.UNKNOWN)
            await context.abort(code, err.message)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("gRPC %s failed", name)
            await context.abort(code, "internal error; the server's log has the details")
        finally:
            metrics.requests.labels(route, "GRPC", code.name).inc()
            metrics.latency.labels(route, "GRPC").observe(time.perf_counter() - start)

    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )


async def start_grpc(
    settings: Settings,
    catalog: Catalog,
    metrics: Metrics,
    admission: Admission,
    heavy_pool: Executor,
) -> grpc.aio.Server:
    """The gRPC service, started on ``settings.host:settings.grpc_port`` in this event loop."""
    service = InferenceService(catalog, admission, heavy_pool)
    names = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata"]
    handlers = {n: _method(n, getattr(service, n), metrics) for n in [*names, "ModelInfer"]}
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),  # every worker process binds the port
            ("grpc.max_receive_message_length", settings.max_upload_bytes),
            ("grpc.max_send_message_length", settings.max_response_bytes),
        ]
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise RuntimeError(f"cannot serve gRPC on {address} (CONVSERVE_GRPC_PORT): {err}") from None
    if port == 0:
        raise RuntimeError(f"cannot serve gRPC on {address} (CONVSERVE_GRPC_PORT)")
    await server.start()
    log.info("KServe v2 gRPC on %s", address)
    return server
