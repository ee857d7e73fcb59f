"""The KServe v2 (Open Inference Protocol) rules that do not depend on the transport: which
engine a model name and version address, the model's metadata, the checks on the input tensor
and the requested outputs. The REST routes (``api/v2.py``) and the gRPC service (``grpc.py``)
both answer through these, so that the two give the same answers and the same errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from convserve import __version__, contract
from convserve.redact import redact
from convserve.service import admission
from convserve.service.catalog import Catalog
from convserve.service.engine import Engine

DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
SERVER_NAME = "convserve"


class V2Error(Exception):
    """A refused request: ``status`` is the HTTP status (the gRPC service maps it to a code)."""

    def __init__(self, status: int, message: str) -> None:
        message = redact(message)  # it may quote a backend's URI
        super().__init__(message)
        self.status, self.message = status, message


def server_metadata(extensions: list[str]) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": extensions}


def find_engine(catalog: Catalog, name: str, version: str | None) -> Engine:
    """The engine serving ``name`` (and ``version``, when given, the challenger's too); 404
    for a version not served. A model not in the set or not loaded: ``Catalog.engine``'s
    ``NotServed``."""
    engine = catalog.engine(name)
    source = engine.model.source
    challenger = catalog.challengers.get(name)
    other = challenger.engine if challenger is not None else None
    if version and other is not None and version == other.model.source.version:
        return other  # a challenger's version, asked for by number
    if version and version != source.version:
        raise V2Error(
            404,
            f"version {version!r} of {name!r} is not loaded; serving version {source.version!r}",
        )
    return engine


def metadata(engine: Engine) -> dict[str, Any]:
    m = engine.model
    outputs = [{"name": contract.PROBABILITIES, "datatype": "FP32", "shape": [-1, len(m.labels)]}]
    outputs += [
        {"name": contract.feature_output(b), "datatype": "FP32", "shape": [-1, *shape]}
        for b, shape in m.feature_shapes.items()
    ]
    return {
        "name": m.source.name,
        "versions": [m.source.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {
                "name": contract.INPUT,
                "datatype": "FP32",
                "shape": [-1, m.channels, m.height, m.width],
            }
        ],
        "outputs": outputs,
    }


def check_input(engine: Engine, name: str, datatype: str, shape: list[int]) -> Any:
    """The numpy dtype of the input tensor described, once its name, datatype and shape fit
    the model."""
    model = engine.model
    if name != contract.INPUT:
        raise V2Error(400, f"unknown input {name!r}; the model takes {contract.INPUT!r}")
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise V2Error(400, f"input datatype {datatype!r} is not accepted; send FP32")
    expected = [model.channels, model.height, model.width]
    if len(shape) != 4 or list(shape[1:]) != expected or shape[0] < 1:
        raise V2Error(
            400, f"input shape {list(shape)} does not match [N, {', '.join(map(str, expected))}]"
        )
    return dtype


def from_bytes(raw: bytes | memoryview, dtype: Any, datatype: str, shape: list[int]) -> np.ndarray:
    """The input tensor from its row-major bytes, as float32."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != size:
        raise V2Error(
            400, f"{len(raw)} bytes of input data do not match shape {list(shape)} of {datatype}"
        )
    return _finite(np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float32))


def from_values(values: Any, shape: list[int]) -> np.ndarray:
    """The input tensor from its values (flat or nested, row-major), as float32."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise V2Error(400, "input data must be numbers, flat or nested row-major") from None
    count = math.prod(shape)
    if array.size != count:
        raise V2Error(
            400, f"input data holds {array.size} values, shape {list(shape)} needs {count}"
        )
    return _finite(array.reshape(shape).astype(np.float32))


def _finite(array: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise V2Error(400, "input data holds NaN or infinite values")
    return array


def outputs_wanted(engine: Engine, names: list[str]) -> list[str]:
    """The outputs named (every output when none is), each once, in the order asked."""
    model = engine.model
    wanted = names or model.output_names
    unknown = [n for n in wanted if n not in model.output_names]
    if unknown:
        raise V2Error(
            400, f"unknown output(s) {', '.join(unknown)}; valid: {', '.join(model.output_names)}"
        )
    return list(dict.fromkeys(wanted))


def infer_cost(engine: Engine, batch: int, wanted: list[str], binary: bool) -> tuple[int, str]:
    """An inference request's cost in admission units (``admission.py``): its images, and
    the outputs it will answer (JSON text, or raw bytes with ``binary``); and in words."""
    model = engine.model
    sizes = {contract.PROBABILITIES: len(model.labels)}
    sizes |= {contract.feature_output(b): math.prod(s) for b, s in model.feature_shapes.items()}
    answer = batch * sum(sizes[name] for name in wanted) * (4 if binary else 12)
    what = f"{batch} image{'s' * (batch != 1)}, {len(wanted)} output{'s' * (len(wanted) != 1)}"
    return admission.request_cost(batch, 1, answer), what
