"""Occlusion maps (Zeiler & Fergus 2014, section 4.2): how much the top class's probability
drops when each region of the input is hidden.

A square patch of a neutral value slides over the model's input with half a patch of stride:
the training images' background for digit models (hiding a region of a digit erases it), the
training data's mean otherwise (the value the model's normalisation maps to 0, so a hidden
region carries no signal either way). Every occluded copy goes through onnxruntime in one
batch, and each pixel's value is the mean drop over the patches that covered it. Positive:
hiding it lowers the probability (it is evidence for the class); negative: hiding it raises
the probability.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from convserve.contract import ModelMetadata

# Patches per side: a 28x28 input gets 4x4 patches with a stride of 2 (13 x 13 = 169 copies).
PATCHES_PER_SIDE = 7


def patch_and_stride(height: int, width: int) -> tuple[int, int]:
    patch = max(1, round(min(height, width) / PATCHES_PER_SIDE))
    return patch, max(1, patch // 2)


def baseline(meta: ModelMetadata) -> np.ndarray:
    """The value a hidden region takes, per channel."""
    if meta.fit.method == "digit":
        level = 0.0 if meta.fit.background == "dark" else 1.0
        return np.full(meta.channels, level, np.float32)
    return np.asarray(meta.normalization.mean, np.float32)


def _starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - patch, 0) + 1, stride))
    if starts[-1] + patch < size:  # the last patch reaches the edge
        starts.append(size - patch)
    return starts


def occlusions(height: int, width: int) -> int:
    """How many occluded copies ``occluded`` makes of a ``height`` x ``width`` input."""
    patch, stride = patch_and_stride(height, width)
    return len(_starts(height, patch, stride)) * len(_starts(width, patch, stride))


def occluded(
    image: np.ndarray, patch: int, stride: int, baseline: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Copies of ``image`` ``[C, H, W]`` with one patch set to ``baseline`` (per channel) each,
    ``[M, C, H, W]``, and the top-left corner of each patch."""
    _, height, width = image.shape
    corners = [
        (y, x) for y in _starts(height, patch, stride) for x in _starts(width, patch, stride)
    ]
    batch = np.repeat(image[None], len(corners), axis=0)
    fill = baseline.astype(image.dtype).reshape(-1, 1, 1)
    for i, (y, x) in enumerate(corners):
        batch[i, :, y : y + patch, x : x + patch] = fill
    return batch, corners


def drop_map(
    reference: float,
    occluded_probs: np.ndarray,
    corners: list[tuple[int, int]],
    patch: int,
    height: int,
    width: int,
) -> np.ndarray:
    """``[H, W]``: each pixel's mean of ``reference - p`` over the patches that covered it."""
    total = np.zeros((height, width), np.float64)
    count = np.zeros((height, width), np.float64)
    for p, (y, x) in zip(occluded_probs.tolist(), corners, strict=True):
        total[y : y + patch, x : x + patch] += reference - p
        count[y : y + patch, x : x + patch] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def input_png(image: np.ndarray) -> str:
    """The model's input ``[C, H, W]`` in [0, 1] as a base64 PNG, as the model saw it."""
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    mode = "L" if pixels.shape[0] == 1 else "RGB"
    picture = Image.fromarray(pixels[0] if mode == "L" else pixels.transpose(1, 2, 0), mode)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
