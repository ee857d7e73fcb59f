"""The contract between training and serving, in one torch-free module.

The ONNX serving contract: an exported model takes ``image`` (float32 ``[batch, channels,
height, width]``, pixels in [0, 1]; normalisation and softmax are inside the graph) and
answers ``probabilities`` ``[batch, classes]`` and ``features.<block>`` for every
convolutional block. Everything the service needs to serve it travels in the file's
``metadata_props`` under ``convserve.*`` keys, written and read through ``ModelMetadata``.

The registry's contract: a model's served version carries the alias ``champion``, the one
tried on live traffic ``challenger``; training promotes into them and the service follows
them, and both write an alias through ``write_alias``.

The job queue's contract (task names, payloads, the job run's tags) is ``convserve.jobs``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

INPUT = "image"
PROBABILITIES = "probabilities"
FEATURE_PREFIX = "features."
METADATA_PREFIX = "convserve."
FEATURE_TENSOR = (
    "output of the block's activation function (after convolution and batch norm, before "
    "pooling and dropout), shape [batch, channels, height, width]"
)


def feature_output(block: str) -> str:
    """The ONNX output name of a block's feature maps: ``block1`` -> ``features.block1``."""
    return FEATURE_PREFIX + block


def block_of(output: str) -> str:
    """The block an output name belongs to: ``features.block1`` -> ``block1``."""
    if not output.startswith(FEATURE_PREFIX):
        raise ValueError(f"{output!r} is not a feature-map output")
    return output.removeprefix(FEATURE_PREFIX)


def output_names(blocks: list[str]) -> list[str]:
    """Every output of an export, in graph order."""
    return [PROBABILITIES, *(feature_output(b) for b in blocks)]


class MetadataError(ValueError):
    """A model file whose ``convserve.*`` metadata is missing or malformed."""


class InputSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = INPUT
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    range: tuple[float, float] = (0.0, 1.0)


class Resize(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: str = "bilinear"
    mode: str = "stretch"  # the whole input is resized to size, aspect ratio not kept
    size: tuple[int, int]  # [height, width]


class Fit(BaseModel):
    """How an upload is fitted to what the training images looked like."""

    model_config = ConfigDict(frozen=True)

    # "stretch": resize the whole image; "digit": crop to the ink, scale, centre (MNIST)
    method: Literal["stretch", "digit"] = "stretch"
    box: float = Field(1.0, gt=0.0, le=1.0)  # digit: the ink's longer side, share of the frame
    center: Literal["mass", "box"] = "mass"  # digit: centre of mass, or of the bounding box
    background: Literal["dark", "light"] = "dark"  # digit: the training images' background


class Normalization(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: list[float]
    std: list[float]
    inside_graph: bool = True


class ModelMetadata(BaseModel):
    """What an exported model says about itself: written by the exporter, read by the service.

    Stored as ``convserve.<field>`` string properties (JSON for structured values), so that any
    ONNX tool shows them; ``from_props`` and ``to_props`` are the only translators.
    """

    model_config = ConfigDict(frozen=True)

    labels: list[str] = Field(min_length=1)  # class names, in output order
    channels: Literal[1, 3]
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    color_mode: Literal["L", "RGB"]
    resize: Resize
    input: InputSpec = Field(default_factory=InputSpec)
    # block -> [channels, height, width] of its feature maps, in block order
    feature_outputs: dict[str, list[int]]
    feature_tensor: str = FEATURE_TENSOR
    normalization: Normalization
    fit: Fit = Field(default_factory=Fit)  # older exports: stretch
    dataset: str = ""
    run_id: str = ""  # the MLflow run that trained it ("" when untracked)
    config_hash: str = ""
    version: str = ""  # convserve version that exported it
    opset: int = Field(ge=1)

    @field_validator("feature_outputs", mode="before")
    @classmethod
    def _block_keys(cls, value: Any) -> Any:
        # Exports before 0.2 keyed this by output name ("features.block1"): read both.
        if isinstance(value, dict):
            return {str(k).removeprefix(FEATURE_PREFIX): v for k, v in value.items()}
        return value

    @property
    def blocks(self) -> list[str]:
        return list(self.feature_outputs)

    def output_names(self) -> list[str]:
        return output_names(self.blocks)

    def to_props(self) -> dict[str, str]:
        """``{"convserve.labels": "[...]", "convserve.height": "28", ...}``."""
        out = {}
        for key, value in self.model_dump(mode="json").items():
            text = value if isinstance(value, str) else json.dumps(value)
            out[METADATA_PREFIX + key] = text
        return out

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Read ``convserve.*`` properties; raises ``MetadataError`` saying what is wrong."""
        data: dict[str, Any] = {}
        for key, field in cls.model_fields.items():
            text = props.get(METADATA_PREFIX + key)
            if text is None:
                if field.is_required():
                    raise MetadataError(
                        f"the model has no {METADATA_PREFIX}{key} metadata; export it with "
                        "`convserve export`"
                    )
                continue
            data[key] = text if _is_text(field.annotation) else _json(key, text)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{METADATA_PREFIX}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()
            )
            raise MetadataError(
                f"the model's convserve metadata is malformed: {problems}"
            ) from None


def _is_text(annotation: Any) -> bool:
    """Stored as the plain string: ``str`` and literals of strings."""
    if annotation is str:
        return True
    return get_origin(annotation) is Literal and all(
        isinstance(a, str) for a in get_args(annotation)
    )


def _json(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MetadataError(f"{METADATA_PREFIX}{key} is not JSON: {err}") from None


# The registry's aliases.

CHAMPION, CHALLENGER = "champion", "challenger"  # the registry's aliases
ALIAS_TRIES = 4  # MLflow's answers to a concurrent write of the same alias, then the next try


def write_alias(write: Callable[[], Any], name: str, alias: str) -> None:
    """``write()`` (model ``name``'s ``alias``), tried again where the registry answered
    BAD_REQUEST (the ``error_code`` of MLflow's exception and of the REST registry's
    ``RegistryError``).
    MLflow's SQL store reads an alias, then inserts or updates it: two writes of one alias at
    once (two promotions into one model) can collide on the insert (a unique constraint) or
    the update (no row), answered 400 BAD_REQUEST. Tried again, the write finds the row the
    other one made; a request that is bad in itself fails every try and is raised."""
    for attempt in range(1, ALIAS_TRIES + 1):
        try:
            write()
            return
        except Exception as err:
            if getattr(err, "error_code", None) != "BAD_REQUEST" or attempt == ALIAS_TRIES:
                raise
            logging.getLogger(__name__).info(
                "alias %s of %s collided with another write; again", alias, name
            )
            time.sleep(0.05 * attempt)


# The job queue.
