"""Decoding uploads and turning them into the model's input, as its metadata says (the
fitting itself is in ``fitting.py``).

The pixel count is checked from the header before any pixel is decoded, so a decompression
bomb costs a header read. Alpha is dropped (PIL's ``convert``), 16-bit images are scaled to
8 bits by their full range, EXIF orientation is applied, GIFs use their first frame.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convserve.contract import Fit
from convserve.service.fitting import FitReport, fit_digit, stretch

FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}


class ImageError(ValueError):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Open, check and fully decode one image (first frame)."""
    if not data:
        raise ImageError("the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"the image is {width}x{height} = {width * height} pixels; the limit is "
                    f"{max_pixels} (CONVSERVE_MAX_PIXELS)",
                    status=413,
                )
            if image.format not in FORMATS:
                raise ImageError(
                    f"{image.format} images are not accepted; send PNG, JPEG, "
                    "WebP, BMP, GIF or TIFF"
                )
            image.seek(0)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(
            f"refused as a decompression bomb: more pixels than the limit of "
            f"{max_pixels} (CONVSERVE_MAX_PIXELS); {err}",
            status=413,
        ) from err
    except UnidentifiedImageError:
        raise ImageError(
            "the upload is not an image PIL can read (PNG, JPEG, WebP, BMP, GIF or TIFF)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"the image is truncated or corrupt: {err}") from err
    upright = ImageOps.exif_transpose(image) or image
    upright.format = image.format  # a transposed copy forgets it; the answer reports it
    return upright


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0, 0, 255).astype(np.uint8))
    elif image.mode == "LAB":  # Pillow converts LAB only through a colour profile
        image = _lab_to_rgb(image)
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError as err:  # a mode Pillow opens but cannot convert
        raise ImageError(f"images in colour mode {image.mode} cannot be converted: {err}") from err


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    from PIL import ImageCms

    try:
        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, transform) or image
    except (ImageCms.PyCMSError, OSError) as err:
        raise ImageError(f"images in colour mode LAB cannot be converted: {err}") from err


def to_input(
    image: Image.Image, channels: int, height: int, width: int, fit: Fit | None = None
) -> tuple[np.ndarray, FitReport]:
    """float32 ``[C, H, W]`` in [0, 1] and how it was made: colour mode converted, then fitted
    as the model's metadata says (``fit``; ``None`` or ``stretch``: resized to the model's
    size with bilinear resampling)."""
    report = FitReport(
        "stretch", original=f"{image.width}x{image.height} {image.mode}", format=image.format
    )
    converted = _to_mode(image, "L" if channels == 1 else "RGB")
    if converted.mode != image.mode:
        report.steps.append(f"converted {image.mode} to {converted.mode}")
    if fit is not None and fit.method == "digit" and channels == 1:
        report.method = "digit"
        converted = fit_digit(converted, height, width, fit, report)
    else:
        converted = stretch(converted, height, width, report)
    array = np.asarray(converted, dtype=np.float32) / 255.0
    if array.ndim == 2:
        return array[None], report
    return np.ascontiguousarray(array.transpose(2, 0, 1)), report


def preprocess(
    data: bytes, channels: int, height: int, width: int, max_pixels: int, fit: Fit | None = None
) -> tuple[np.ndarray, FitReport]:
    """Decode ``data`` and make it the model's input (``to_input``)."""
    return to_input(decode(data, max_pixels), channels, height, width, fit)
