"""The KServe v2 (Open Inference Protocol) bodies: requests, answers and their examples."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class OutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


INFER_EXAMPLE: dict[str, Any] = {
    "id": "42",
    "inputs": [
        {
            "name": "image",
            "shape": [1, 1, 28, 28],
            "datatype": "FP32",
            "data": "(784 numbers in [0, 1], flat or nested, row-major)",
        }
    ],
    "outputs": [{"name": "probabilities"}],
}


class InferRequest(BaseModel):
    model_config = {"json_schema_extra": {"examples": [INFER_EXAMPLE]}}

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn] = Field(min_length=1, max_length=1, description="'image' alone")
    outputs: list[OutputRequest] | None = None


class ServerMetadata(BaseModel):
    name: str = Field(description="The server's name")
    version: str = Field(description="The server's version")
    extensions: list[str] = Field(description="Protocol extensions it speaks")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {"name": "convserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
            ]
        }
    }


class Live(BaseModel):
    live: bool

    model_config = {"json_schema_extra": {"examples": [{"live": True}]}}


class Ready(BaseModel):
    ready: bool

    model_config = {"json_schema_extra": {"examples": [{"ready": True}]}}


class ModelReady(BaseModel):
    name: str
    ready: bool

    model_config = {"json_schema_extra": {"examples": [{"name": "convserve", "ready": True}]}}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch axis")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "name": "convserve",
                    "versions": ["3"],
                    "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                    "outputs": [
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                        {"name": "features.block1", "datatype": "FP32", "shape": [-1, 16, 28, 28]},
                    ],
                }
            ]
        }
    }


class TensorOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size when the tensor follows the JSON as bytes"
    )
    data: list[float] | None = Field(None, description="Row-major values (JSON tensors)")


class InferResponse(BaseModel):
    id: str | None = None
    model_name: str
    model_version: str | None
    outputs: list[TensorOut]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "id": "42",
                    "model_name": "convserve",
                    "model_version": "3",
                    "outputs": [
                        {
                            "name": "probabilities",
                            "datatype": "FP32",
                            "shape": [1, 10],
                            "data": [0.0, 0.0, 0.01, 0.0, 0.0, 0.0, 0.0, 0.98, 0.0, 0.01],
                        }
                    ],
                }
            ]
        }
    }
