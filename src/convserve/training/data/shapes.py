"""A procedural RGB shapes set after Glorot & Bengio's Shapeset-3x2 (2010, section 2.1).

Each image holds one or two shapes out of triangle, parallelogram and ellipse, each with a
random colour, position, scale and rotation, on a dark random background. The class is the
unordered set of shapes present: 3 singles + 6 pairs = 9 classes, as in the paper. Generation
is deterministic given the seed and works at any image size.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("triangle", "parallelogram", "ellipse")
CLASSES: list[tuple[str, ...]] = [(s,) for s in SHAPES] + list(
    itertools.combinations_with_replacement(SHAPES, 2)
)
CLASS_NAMES = ["+".join(c) for c in CLASSES]


def _outline(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-size outline points of a shape, centred on the origin."""
    if kind == "triangle":
        return np.array([[0.0, -0.6], [0.55, 0.45], [-0.55, 0.45]])
    if kind == "parallelogram":
        skew = rng.uniform(0.2, 0.45)
        return np.array(
            [[-0.5 + skew, -0.3], [0.5 + skew, -0.3], [0.5 - skew, 0.3], [-0.5 - skew, 0.3]]
        )
    t = np.linspace(0.0, 2 * math.pi, 24, endpoint=False)
    ratio = rng.uniform(0.45, 0.8)
    return np.stack([0.55 * np.cos(t), 0.55 * ratio * np.sin(t)], axis=1)


def _draw(
    draw: ImageDraw.ImageDraw, kind: str, centre: np.ndarray, size: float, rng: np.random.Generator
) -> None:
    angle = rng.uniform(0.0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = _outline(kind, rng) @ rot.T * size + centre
    colour = tuple(int(c) for c in rng.integers(90, 256, size=3))
    draw.polygon([tuple(p) for p in points], fill=colour)


def render(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class ``label``."""
    background = tuple(int(c) for c in rng.integers(0, 60, size=3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    kinds = CLASSES[label]
    if len(kinds) == 1:
        size = rng.uniform(0.45, 0.8) * image_size
        centre = rng.uniform(0.4, 0.6, size=2) * image_size
        _draw(draw, kinds[0], centre, size, rng)
    else:
        # Two shapes on either side of a random line through the centre, so they rarely overlap.
        theta = rng.uniform(0.0, math.pi)
        offset = np.array([math.cos(theta), math.sin(theta)]) * 0.24 * image_size
        middle = np.full(2, image_size / 2) + rng.uniform(-0.04, 0.04, size=2) * image_size
        for kind, sign in zip(kinds, (1.0, -1.0), strict=True):
            size = rng.uniform(0.3, 0.45) * image_size
            _draw(draw, kind, middle + sign * offset, size, rng)
    return np.asarray(image)


def generate(
    num_samples: int, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, H, W], labels int64 [N]), classes balanced, deterministic by seed."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples) % len(CLASSES)
    rng.shuffle(labels)
    images = np.stack([render(int(y), image_size, rng) for y in labels])
    return images.transpose(0, 3, 1, 2).copy(), labels.astype(np.int64)
