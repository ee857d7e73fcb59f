"""Fitting an upload to what the model's training images looked like, as its metadata says.

``stretch`` resizes the whole image to the model's input size. ``digit`` does what MNIST's
authors did to every training digit (LeCun et al., "The MNIST database"): the digit's ink is
cropped, scaled so that its longer side fills a box (20 of 28 pixels), and placed so that its
centre of mass is the centre of the frame; a light background is inverted first, since the
training digits are light ink on a dark background. A caller can turn fitting off
(``fit=none``), which stretches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from convserve.contract import Fit

# A pixel is ink when it stands out from the background by this share of the image's range.
INK_THRESHOLD = 0.25
MNIST_STROKE = 3.4  # stroke width of MNIST's training digits in pixels of 28 (see _thicken)


@dataclass
class FitReport:
    """How one upload was fitted, for the answer: a caller can see why a photo was misread."""

    method: str  # "digit", "stretch"
    original: str = ""  # "640x480 RGB"
    format: str | None = None  # "PNG", "JPEG", ...
    steps: list[str] = field(default_factory=list)


def report_for(image: Image.Image) -> FitReport:
    """A report that starts with what was uploaded: size, colour mode and format."""
    return FitReport("stretch", f"{image.width}x{image.height} {image.mode}", image.format)


def stretch(image: Image.Image, height: int, width: int, report: FitReport) -> Image.Image:
    if image.size != (width, height):
        report.steps.append(f"stretched {image.width}x{image.height} to {width}x{height}")
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image


def fit_digit(
    image: Image.Image, height: int, width: int, fit: Fit, report: FitReport
) -> np.ndarray:
    """A grey (``L``) image of a digit, fitted as MNIST's digits were (see the module doc):
    ``[height, width]`` float32 grey levels in 0..255. Works on 8-bit arrays, in as few
    operations as the steps allow: a 28x28 upload costs a few tens of microseconds."""
    grey = pixels(image)
    background = _median(np.concatenate((grey[0], grey[-1], grey[:, 0], grey[:, -1])))
    if (background > 127) != (fit.background == "light"):
        grey = 255 - grey
        background = 255 - background
        report.steps.append("inverted: light background, the model knows a dark one")
    ink = np.maximum(grey, background) - np.uint8(background)  # uint8, 0 on the background
    peak = int(ink.max())
    if peak < 32:  # no ink to speak of: nothing to crop or centre
        report.method = "stretch"
        report.steps.append("no ink found: stretched instead")
        return np.asarray(stretch(image, height, width, report), np.float32)
    rows, cols = np.nonzero(ink > INK_THRESHOLD * peak)  # the peak's pixel at least
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols.min()), int(cols.max()) + 1
    crop = ink[top:bottom, left:right]
    if peak < 255:
        crop = (crop * (255.0 / peak)).astype(np.uint8)
    report.steps.append(f"cropped to the ink: {right - left}x{bottom - top} at ({left}, {top})")
    box = max(1, round(fit.box * min(height, width)))
    digit = _thicken(crop, box, report)
    scale = box / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    # LANCZOS anti-aliases like the MNIST normalisation, which left grey levels at the edges
    scaled = lanczos(digit, size[1], size[0])
    report.steps.append(f"scaled to {size[0]}x{size[1]} (longer side {box} px)")
    return _centre(scaled, height, width, fit, report)


def pixels(image: Image.Image) -> np.ndarray:
    """An 8-bit single-band image as a read-only ``[height, width]`` uint8 array."""
    return np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width)


def lanczos(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """``array`` ``[h, w]`` resized to ``[height, width]`` with Pillow's ``LANCZOS`` filter
    (Lanczos-3, stretched by the scale when reducing, which anti-aliases), computed in float:
    float32 grey levels clipped to 0..255. Pillow rounds and clips to 8 bits between its two
    passes: on drawn digits the two agree at the median and differ by about 4 grey levels at
    the 99th percentile (where Pillow's clipping cuts the filter's ringing). As two products
    with cached filter matrices, it costs a fraction of a round trip through a PIL image."""
    h, w = array.shape
    out = array.astype(np.float32)
    if width != w:
        out = out @ _lanczos_matrix(w, width).T
    if height != h:
        out = _lanczos_matrix(h, height) @ out
    return np.clip(out, 0.0, 255.0, out=out)


@functools.lru_cache(maxsize=256)
def _lanczos_matrix(size: int, out: int) -> np.ndarray:
    """The ``[out, size]`` filter matrix: output pixel ``i`` is centred on input coordinate
    ``(i + 0.5) * size / out``; each row sums to one (Pillow's ``precompute_coeffs``)."""
    scale = size / out
    stretch = max(scale, 1.0)
    centres = (np.arange(out) + 0.5) * scale
    offsets = (np.arange(size) + 0.5)[None, :] - centres[:, None]
    x = offsets / stretch
    weights = np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    matrix = weights.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _median(values: np.ndarray) -> int:
    """The median of 8-bit values, rounded (np.median costs more than the whole fit)."""
    ordered = np.sort(values)
    n = len(ordered)
    return (int(ordered[(n - 1) // 2]) + int(ordered[n // 2]) + 1) // 2


def stroke_width(mask: np.ndarray) -> float:
    """The mean width of the strokes in a boolean ink mask: twice the area over the number of
    edge pixels (a stroke of width w and length L has area wL and about 2L edge pixels). A
    pixel on the mask's border is an edge pixel: what lies outside counts as background."""
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    area = int(np.count_nonzero(mask))
    edge = area - int(np.count_nonzero(inner))
    return 2.0 * area / max(edge, 1)


def _thicken(crop: np.ndarray, box: int, report: FitReport) -> np.ndarray:
    """Thicken strokes that scaling would thin below MNIST's: its digits' strokes are about
    3.4 px wide in 28 (median of the training set, ``stroke_width``), a pen line across a
    large canvas would be a fraction of a pixel. Works at four times the box, so the cost does
    not grow with the upload."""
    work = 4 * box
    if max(crop.shape) > work:
        ratio = work / max(crop.shape)
        size = (max(1, round(crop.shape[1] * ratio)), max(1, round(crop.shape[0] * ratio)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BOX))
    width = stroke_width(crop > INK_THRESHOLD * int(crop.max()))
    longer = max(crop.shape)
    target = MNIST_STROKE * longer / box
    if width < 0.75 * target:
        size = round(target - width) // 2 * 2 + 1  # odd, at least 1
        if size > 1:
            crop = _dilate(crop, size)
            report.steps.append(f"thickened thin strokes ({width * box / longer:.1f} px)")
    return crop


def _dilate(array: np.ndarray, size: int) -> np.ndarray:
    """A ``size`` x ``size`` maximum filter (grey dilation), as a 1-D maximum along rows, then
    along columns: the same result as PIL's ``MaxFilter(size)`` at a fraction of its cost."""
    half = size // 2
    h, w = array.shape
    padded = np.zeros((h + 2 * half, w + 2 * half), array.dtype)
    padded[half : half + h, half : half + w] = array
    rows = padded[:, :w].copy()
    for d in range(1, size):
        np.maximum(rows, padded[:, d : d + w], out=rows)
    out = rows[:h].copy()
    for d in range(1, size):
        np.maximum(out, rows[d : d + h], out=out)
    return out


def _centre(digit: np.ndarray, height: int, width: int, fit: Fit, report: FitReport) -> np.ndarray:
    frame = np.zeros((height, width), np.float32)
    h, w = digit.shape
    rows = digit.sum(axis=1)
    total = float(rows.sum())
    if fit.center == "mass" and total > 0:
        cy = float(rows @ np.arange(h, dtype=np.float32)) / total
        cx = float(digit.sum(axis=0) @ np.arange(w, dtype=np.float32)) / total
    else:
        cy, cx = (h - 1) / 2, (w - 1) / 2
    top = round((height - 1) / 2 - cy)
    left = round((width - 1) / 2 - cx)
    # clip the paste to the frame (a centre of mass far off centre can push ink outside)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    frame[y0:y1, x0:x1] = digit[y0 - top : y1 - top, x0 - left : x1 - left]
    report.steps.append(f"centred by {fit.center} in {width}x{height}")
    return frame
