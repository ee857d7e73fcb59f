"""Digits as people draw them: rendered from fonts and from pen strokes, at several sizes,
positions and stroke widths, dark on light and light on dark, on a 200x200 canvas."""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian's fonts-dejavu-core
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
# Pen strokes in a unit box (x right, y down), drawn the way people write each digit.
STROKES: dict[int, list[tuple[float, float]]] = {
    0: [
        (0.5, 0),
        (0.85, 0.2),
        (0.9, 0.5),
        (0.8, 0.85),
        (0.5, 1),
        (0.2, 0.85),
        (0.1, 0.5),
        (0.15, 0.2),
        (0.5, 0),
    ],
    1: [(0.35, 0.2), (0.55, 0), (0.55, 1)],
    2: [(0.15, 0.2), (0.4, 0), (0.75, 0.05), (0.85, 0.3), (0.7, 0.55), (0.15, 1), (0.9, 1)],
    3: [(0.15, 0.05), (0.8, 0.05), (0.45, 0.45), (0.8, 0.6), (0.85, 0.85), (0.55, 1), (0.15, 0.9)],
    4: [(0.65, 1), (0.65, 0), (0.1, 0.7), (0.95, 0.7)],
    5: [
        (0.85, 0),
        (0.2, 0),
        (0.15, 0.45),
        (0.55, 0.4),
        (0.85, 0.6),
        (0.8, 0.9),
        (0.5, 1),
        (0.15, 0.9),
    ],
    6: [
        (0.75, 0),
        (0.35, 0.3),
        (0.15, 0.7),
        (0.35, 1),
        (0.7, 0.95),
        (0.8, 0.7),
        (0.55, 0.5),
        (0.2, 0.65),
    ],
    7: [(0.1, 0), (0.9, 0), (0.4, 1)],
    8: [
        (0.5, 0.5),
        (0.2, 0.3),
        (0.5, 0),
        (0.8, 0.25),
        (0.5, 0.5),
        (0.15, 0.75),
        (0.5, 1),
        (0.85, 0.75),
        (0.5, 0.5),
    ],
    9: [(0.8, 0.35), (0.5, 0.5), (0.2, 0.3), (0.45, 0), (0.8, 0.15), (0.8, 0.5), (0.6, 1)],
}
SIZE = (200, 200)


def _canvas(light: bool) -> tuple[Image.Image, int]:
    return Image.new("L", SIZE, 255 if light else 0), 0 if light else 255


def font_digit(digit: int, font: str, px: int, at: tuple[int, int], light: bool) -> Image.Image:
    image, ink = _canvas(light)
    face = ImageFont.truetype(str(FONT_DIR / font), px)
    ImageDraw.Draw(image).text(at, str(digit), fill=ink, font=face)
    return image


def stroke_digit(
    digit: int, box: tuple[int, int, int, int], width: int, light: bool
) -> Image.Image:
    image, ink = _canvas(light)
    x0, y0, w, h = box
    points = [(x0 + x * w, y0 + y * h) for x, y in STROKES[digit]]
    ImageDraw.Draw(image).line(points, fill=ink, width=width, joint="curve")
    return image


def corpus() -> list[tuple[int, str, Image.Image]]:
    """(digit, description, image): 42 variants of each digit."""
    out = []
    for digit in range(10):
        for font, (px, at), light in itertools.product(
            FONTS, [(40, (20, 20)), (150, (30, 0)), (80, (100, 90))], [False, True]
        ):
            desc = f"{font} {px}px at {at}, {'dark on light' if light else 'light on dark'}"
            out.append((digit, desc, font_digit(digit, font, px, at, light)))
        for box, width, light in itertools.product(
            [(20, 20, 40, 60), (30, 10, 120, 180), (110, 100, 60, 90)], [3, 10, 18], [False, True]
        ):
            desc = f"stroke in {box} width {width}, {'dark on light' if light else 'light on dark'}"
            out.append((digit, desc, stroke_digit(digit, box, width, light)))
    return out
