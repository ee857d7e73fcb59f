"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from convserve.contract import ModelMetadata


class ModelRef(BaseModel):
    name: str
    version: str | None = Field(description="Registered version, or 'file' for a local file")
    alias: str | None = Field(None, description="The registry alias followed, if any")
    run_id: str | None = Field(None, description="The MLflow run that trained it")


class ClassScore(BaseModel):
    label: str
    index: int
    probability: float


class GridLayout(BaseModel):
    """How channels are tiled in a feature-map PNG: row-major, channel i at row i // cols,
    column i % cols; each tile scaled to its own channel's min..max."""

    rows: int
    cols: int
    tile_height: int
    tile_width: int
    channels: int
    order: Literal["row-major"] = "row-major"
    scaling: Literal["per-channel min-max to 0-255"] = "per-channel min-max to 0-255"


class FeatureMap(BaseModel):
    shape: list[int] = Field(description="[channels, height, width]")
    format: Literal["png", "array", "stats"]
    png: str | None = Field(None, description="base64 PNG (format=png)")
    grid: GridLayout | None = None
    data: list[Any] | None = Field(None, description="raw values [C][H][W] (format=array)")
    mean: list[float] | None = Field(None, description="per-channel mean (format=stats)")
    max: list[float] | None = Field(None, description="per-channel max (format=stats)")


class FittedInput(BaseModel):
    """How the upload became the model's input: a caller can tell why a photo was misread."""

    original: str = Field(description="The upload's size and colour mode, e.g. '640x480 RGB'")
    format: str | None = Field(None, description="PNG, JPEG, WEBP, BMP, GIF, TIFF or MPO")
    fit: Literal["digit", "stretch"] = Field(
        description="digit: cropped to the ink, scaled and centred as the training digits "
        "were; stretch: the whole image resized to the model's input size"
    )
    steps: list[str] = Field(description="What was done, in order")


class Prediction(BaseModel):
    filename: str | None
    input: FittedInput
    top_k: list[ClassScore]
    probabilities: dict[str, float] = Field(description="Every class's probability, by label")
    feature_maps: dict[str, FeatureMap] | None = Field(
        None, description="By block name; the output of the block's activation, before pooling"
    )


class Timing(BaseModel):
    decode_ms: float
    inference_ms: float
    total_ms: float


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    predictions: list[Prediction] = Field(description="One per uploaded image, in order")
    time: Timing

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "request_id": "5f0c4d7e9a2b4c21",
                    "model": {
                        "name": "convserve",
                        "version": "3",
                        "alias": "champion",
                        "run_id": "0a1b2c3d4e5f",
                    },
                    "predictions": [
                        {
                            "filename": "seven.png",
                            "top_k": [
                                {"label": "7", "index": 7, "probability": 0.991},
                                {"label": "9", "index": 9, "probability": 0.006},
                            ],
                            "probabilities": {"0": 0.0, "1": 0.001, "7": 0.991, "9": 0.006},
                            "feature_maps": None,
                        }
                    ],
                    "time": {"decode_ms": 0.4, "inference_ms": 0.3, "total_ms": 1.1},
                }
            ]
        }
    }


class ModelInfo(BaseModel):
    name: str
    version: str | None
    alias: str | None
    run_id: str | None
    uri: str
    labels: list[str]
    input: dict[str, Any] = Field(description="name, dtype, shape [batch, C, H, W], range")
    color_mode: str
    feature_outputs: dict[str, list[int]] = Field(description="block -> [C, H, W]")
    opset: int
    providers: list[str]
    loaded_at: str
    metadata: ModelMetadata = Field(description="The model's own convserve.* metadata")


class Health(BaseModel):
    status: str
    model_version: str | None = None
    detail: str | None = None


class ReloadResult(BaseModel):
    changed: bool
    version: str | None
    message: str
