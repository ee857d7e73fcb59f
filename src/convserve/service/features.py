"""Feature maps in the three response formats: tiled PNG grids, raw arrays, per-channel stats."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from convserve.service.schemas import GridLayout


def grid_shape(channels: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(channels))
    return math.ceil(channels / cols), cols


def tile_png(fmap: np.ndarray) -> tuple[str, GridLayout]:
    """``[C, H, W]`` -> one PNG grid (row-major, one tile per channel), each channel scaled
    to its own min..max, base64."""
    channels, height, width = fmap.shape
    rows, cols = grid_shape(channels)
    low = fmap.min(axis=(1, 2), keepdims=True)
    span = fmap.max(axis=(1, 2), keepdims=True) - low
    scaled = np.where(span > 0, (fmap - low) / np.where(span > 0, span, 1.0), 0.0)
    tiles = np.zeros((rows * cols, height, width), np.uint8)
    tiles[:channels] = np.round(scaled * 255.0).astype(np.uint8)
    grid = tiles.reshape(rows, cols, height, width).transpose(0, 2, 1, 3)
    buffer = io.BytesIO()
    Image.fromarray(grid.reshape(rows * height, cols * width), "L").save(buffer, "PNG")
    layout = GridLayout(
        rows=rows, cols=cols, tile_height=height, tile_width=width, channels=channels
    )
    return base64.b64encode(buffer.getvalue()).decode("ascii"), layout


def render_values(fmap: np.ndarray, fmt: str) -> dict[str, Any]:
    """One block's maps of one image in ``fmt`` as plain values, as the response writes them
    (``schemas.FeatureMap``'s fields, none empty): an array's values are not validated one by
    one."""
    shape = list(fmap.shape)
    if fmt == "png":
        png, layout = tile_png(fmap)
        return {"shape": shape, "format": "png", "png": png, "grid": layout.model_dump()}
    if fmt == "array":
        return {"shape": shape, "format": "array", "data": fmap.astype(float).tolist()}
    return {
        "shape": shape,
        "format": "stats",
        "mean": fmap.mean(axis=(1, 2)).astype(float).tolist(),
        "max": fmap.max(axis=(1, 2)).astype(float).tolist(),
    }


def estimate_bytes(shapes: list[list[int]], fmt: str, images: int) -> int:
    """A conservative size of the JSON for these feature maps, before building it."""
    per_image = 0
    for shape in shapes:
        values = math.prod(shape)
        if fmt == "array":
            per_image += values * 12  # a float as JSON text with its separator
        elif fmt == "png":
            per_image += values * 4 // 3 + 256  # worst case: incompressible, base64
        else:
            per_image += shape[0] * 2 * 12
    return per_image * images
