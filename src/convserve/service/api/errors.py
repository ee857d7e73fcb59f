"""The error answers the API gives, as documented bodies: ``{"detail": ...}`` on the REST
routes, ``{"error": ...}`` on KServe v2 (its protocol's form)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Problem(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is, e.g. ['body', 'train', 'seed']")
    msg: str = Field(description="What is wrong")
    type: str = Field(description="pydantic's error type")


class ErrorBody(BaseModel):
    """Every REST error: a sentence that says what to do, or the list of invalid fields."""

    detail: str | list[Problem]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {"detail": "x.png: the upload is not an image PIL can read (PNG, JPEG, ...)"},
                {
                    "detail": [
                        {
                            "loc": ["body", "train", "model", "activation"],
                            "msg": "Input should be 'sigmoid', 'tanh', 'relu', ...",
                            "type": "literal_error",
                        }
                    ]
                },
            ]
        }
    }


class V2ErrorBody(BaseModel):
    """KServe v2 errors (Open Inference Protocol)."""

    error: str = Field(examples=["unknown model 'resnet'; this server serves 'convserve'"])


_MEANING = {
    400: "A malformed request",
    401: "Missing or invalid bearer token (CONVSERVE_API_TOKEN), or none is set on the server",
    404: "No such thing",
    409: "The request conflicts with the current state",
    413: "Too large: the upload (CONVSERVE_MAX_UPLOAD_BYTES), the image's pixels "
    "(CONVSERVE_MAX_PIXELS) or the number of images (CONVSERVE_MAX_FILES)",
    422: "Invalid parameters or body; the detail names each field",
    429: "Too many queued jobs (CONVSERVE_MAX_QUEUED_JOBS); try again after Retry-After seconds",
    503: "Not available right now: no model loaded yet, or MLflow or the queue unreachable",
}


def errors(*codes: int, v2: bool = False, **meanings: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each code with its meaning (``meanings`` override by
    ``e404="..."``) and its body model."""
    model = V2ErrorBody if v2 else ErrorBody
    return {
        code: {"model": model, "description": meanings.get(f"e{code}", _MEANING[code])}
        for code in codes
    }
