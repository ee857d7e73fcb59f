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


def stretch(image: Image.Image, height: int, width: int, report: FitReport) -> np.ndarray:
    """The whole 8-bit image (``L`` or ``RGB``) resized to ``[height, width]`` (bilinear):
    float32 ``[C, height, width]`` in 0..1, channels first. Scaled and reordered in one pass
    into one new array: converting to float, scaling and making the channel-first copy one
    after the other took 0.64 ms on a 224x224 RGB image, where the one pass takes 0.14-0.23 ms
    (each step wrote 600 KB of new memory)."""
    if image.size != (width, height):
        report.steps.append(f"stretched {image.width}x{image.height} to {width}x{height}")
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = pixels(image).reshape(height, width, -1)  # [height, width, bands]
    out = np.empty((array.shape[2], height, width), np.float32)
    np.multiply(array.transpose(2, 0, 1), np.float32(1 / 255), out=out)
    return out


def fit_digit(
    image: Image.Image, height: int, width: int, fit: Fit, report: FitReport
) -> np.ndarray:
    """A grey (``L``) image of a digit, fitted as MNIST's digits were (see the module doc):
    ``[height, width]`` float32 in 0..1, the ink's peak at 1. Works on 8-bit arrays, in as few
    array operations as the steps allow (each costs a microsecond or more whatever its size, and
    a 28x28 upload needs about thirty)."""
    grey = pixels(image)
    background = _median(grey.ravel().take(_border(*grey.shape)))
    invert = (background > 127) != (fit.background == "light")
    if invert:
        report.steps.append("inverted: light background, the model knows a dark one")
    ink = _ink_table(background, invert).take(grey)  # uint8, 0 on the background
    peak = int(ink.max())
    if peak < 32:  # no ink to speak of: nothing to crop or centre
        report.method = "stretch"
        report.steps.append("no ink found: stretched instead")
        return stretch(image, height, width, report)[0]
    mask = ink > INK_THRESHOLD * peak  # the peak's pixel at least
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols.min()), int(cols.max()) + 1
    report.steps.append(f"cropped to the ink: {right - left}x{bottom - top} at ({left}, {top})")
    box = max(1, round(fit.box * min(height, width)))
    digit = _thicken(ink[top:bottom, left:right], mask[top:bottom, left:right], box, report)
    scale = box / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    # LANCZOS anti-aliases like the MNIST normalisation, which left grey levels at the edges
    scaled = lanczos(digit, size[1], size[0], high=peak)
    report.steps.append(f"scaled to {size[0]}x{size[1]} (longer side {box} px)")
    return _centre(scaled, height, width, fit, report, gain=1 / peak)


@functools.lru_cache(maxsize=64)
def _border(height: int, width: int) -> np.ndarray:
    """The flat indices of an image's border pixels (each once or twice: the median does not
    care)."""
    rows, cols = np.arange(height) * width, np.arange(width)
    index = np.concatenate((cols, rows[-1] + cols, rows, rows + width - 1))
    index.setflags(write=False)
    return index


@functools.lru_cache(maxsize=512)
def _ink_table(background: int, invert: bool) -> np.ndarray:
    """How far each grey level stands out from the background, as ink: ``max(v - background,
    0)``, or ``max(background - v, 0)`` where a light background is inverted."""
    levels = np.arange(256) - background
    table = np.maximum(-levels if invert else levels, 0).astype(np.uint8)
    table.setflags(write=False)
    return table


def pixels(image: Image.Image) -> np.ndarray:
    """An 8-bit image as a read-only uint8 array: ``[height, width]`` for a single band,
    ``[height, width, bands]`` for more."""
    array = np.frombuffer(image.tobytes(), np.uint8)
    bands = len(image.getbands())
    shape = (image.height, image.width, bands) if bands > 1 else (image.height, image.width)
    return array.reshape(shape)


def lanczos(array: np.ndarray, height: int, width: int, high: float = 255.0) -> np.ndarray:
    """``array`` ``[h, w]`` resized to ``[height, width]`` with Pillow's ``LANCZOS`` filter
    (Lanczos-3, stretched by the scale when reducing, which anti-aliases), computed in float:
    float32 values clipped to 0..``high`` (the filter rings past its input's range). Pillow
    rounds and clips to 8 bits between its two passes: on drawn digits the two agree at the
    median and differ by about 4 grey levels at the 99th percentile (where Pillow's clipping
    cuts the ringing). As two products with cached filter matrices, it costs a fraction of a
    round trip through a PIL image."""
    h, w = array.shape
    out = array
    if width != w:
        out = out @ _lanczos_matrix(w, width).T  # 8-bit input: cast inside the product
    if height != h:
        out = _lanczos_matrix(h, height) @ out
    if out is array:
        out = array.astype(np.float32)
    np.maximum(out, 0.0, out=out)
    return np.minimum(out, high, out=out)


@functools.lru_cache(maxsize=256)
def _lanczos_matrix(size: int, out: int) -> np.ndarray:
    """The ``[out, size]`` filter matrix: output pixel ``i`` is centred on input coordinate
    ``(i + 0.5) * size / out``; each row sums to one (Pillow's ``precompute_coeffs``). Stored
    column-major: its transpose, the row pass's operand, is the contiguous one."""
    scale = size / out
    stretch = max(scale, 1.0)
    centres = (np.arange(out) + 0.5) * scale
    offsets = (np.arange(size) + 0.5)[None, :] - centres[:, None]
    x = offsets / stretch
    weights = np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    matrix = np.asfortranarray(weights, np.float32)
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


def _thicken(crop: np.ndarray, mask: np.ndarray, box: int, report: FitReport) -> np.ndarray:
    """Thicken strokes that scaling would thin below MNIST's: its digits' strokes are about
    3.4 px wide in 28 (median of the training set, ``stroke_width``), a pen line across a
    large canvas would be a fraction of a pixel. ``mask`` is the crop's ink. Works at four
    times the box, so the cost does not grow with the upload."""
    work = 4 * box
    if max(crop.shape) > work:
        ratio = work / max(crop.shape)
        size = (max(1, round(crop.shape[1] * ratio)), max(1, round(crop.shape[0] * ratio)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BOX))
        mask = crop > INK_THRESHOLD * int(crop.max())
    width = stroke_width(mask)
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
    rows = np.maximum(padded[:, :w], padded[:, 1 : 1 + w])
    for d in range(2, size):
        np.maximum(rows, padded[:, d : d + w], out=rows)
    out = np.maximum(rows[:h], rows[1 : 1 + h])
    for d in range(2, size):
        np.maximum(out, rows[d : d + h], out=out)
    return out


def _centre(
    digit: np.ndarray, height: int, width: int, fit: Fit, report: FitReport, gain: float
) -> np.ndarray:
    """``digit`` times ``gain``, placed in a ``[height, width]`` frame by its centre of mass
    (or of its box)."""
    h, w = digit.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    if fit.center == "mass":
        # the digit's moments in two products: [[mass, mass * x], [mass * y, mass * x * y]]
        (mass, mx), (my, _) = (_moments(h) @ digit @ _moments(w).T).tolist()
        if mass > 0:
            cy, cx = my / mass, mx / mass
    top = round((height - 1) / 2 - cy)
    left = round((width - 1) / 2 - cx)
    # clip the paste to the frame (a centre of mass far off centre can push ink outside)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    frame = np.zeros((height, width), np.float32)
    np.multiply(digit[y0 - top : y1 - top, x0 - left : x1 - left], gain, out=frame[y0:y1, x0:x1])
    report.steps.append(f"centred by {fit.center} in {width}x{height}")
    return frame


@functools.lru_cache(maxsize=64)
def _moments(size: int) -> np.ndarray:
    """``[2, size]``: ones, and each position's coordinate."""
    matrix = np.stack((np.ones(size), np.arange(size))).astype(np.float32)
    matrix.setflags(write=False)
    return matrix
