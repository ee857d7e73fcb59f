"""Decoding uploads and turning them into the model's input, as its metadata says (the
fitting itself is in ``fitting.py``).

The pixel count is checked from the header before any pixel is decoded, so a decompression
bomb costs a header read. Alpha is dropped (PIL's ``convert``), 16-bit images are scaled to
8 bits by their full range, EXIF orientation is applied, GIFs use their first frame.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convserve.contract import Fit
from convserve.service.fitting import FitReport, fit_digit, report_for, stretch

FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO", "PPM"}  # PPM: netpbm PBM/PGM/PPM
# Where Pillow finds an orientation (``Image.getexif``): these formats' own tags, or these
# ``info`` entries (EXIF, a PNG's EXIF text chunk, XMP) of any format
TAGGED_FORMATS = {"JPEG", "MPO", "TIFF", "WEBP"}
ORIENTATION_INFO = {"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"}


class ImageError(ValueError):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode(data: bytes, max_pixels: int, work: int | None = None) -> Image.Image:
    """Open, check and fully decode one image (first frame), reduced so that its longer side
    is at most about ``work`` pixels (``None``: full size)."""
    return load(open_image(data, max_pixels), work)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only: refuse empty uploads, too many pixels and formats not accepted
    before any pixel is decoded (a decompression bomb costs a header read)."""
    if not data:
        raise ImageError("the upload is empty")
    with _decode_errors(max_pixels):
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
                f"{image.format} images are not accepted; "
                "send PNG, JPEG, WebP, BMP, GIF, TIFF or PNM"
            )
    return image


def load(image: Image.Image, work: int | None = None) -> Image.Image:
    """Decode an opened image, upright (EXIF orientation applied) and reduced early: JPEGs
    decode at 1/2, 1/4 or 1/8 scale when that is still larger than ``work`` (``draft``), and
    anything larger than twice ``work`` is box-reduced before any conversion or float copy."""
    fmt = image.format
    with _decode_errors(image.width * image.height, bombs=False):  # checked when opened
        image.seek(0)
        if work is not None and fmt == "JPEG":
            image.draft(image.mode, (work, work))
        image.load()
        if fmt in TAGGED_FORMATS or not ORIENTATION_INFO.isdisjoint(image.info):
            image = ImageOps.exif_transpose(image) or image
    if work is not None and max(image.size) > 2 * work:
        image = _shrink(image, max(image.size) // work)
    image.format = fmt  # a transposed or reduced copy forgets it; the answer reports it
    return image


def _shrink(image: Image.Image, factor: int) -> Image.Image:
    """Average ``factor`` x ``factor`` blocks (C code, one small output image)."""
    try:
        return image.reduce(factor)
    except ValueError:  # modes reduce does not take (1, P, I;16): a box resize does the same
        size = (max(1, image.width // factor), max(1, image.height // factor))
        return image.resize(size, Image.Resampling.BOX)


@contextlib.contextmanager
def _decode_errors(max_pixels: int, bombs: bool = True) -> Iterator[None]:
    """Pillow's errors, and its bomb warning (where ``bombs``: Pillow checks when it opens
    an image), as ``ImageError`` answers."""
    try:
        if bombs:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        else:
            yield
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
            "the upload is not an image PIL can read (PNG, JPEG, WebP, BMP, GIF, TIFF or PNM)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"the image is truncated or corrupt: {err}") from err


def work_size(height: int, width: int) -> int:
    """How large an image is worth decoding for a model of this input size: 16 times its
    longer side, at least 512 px (room for cropping a small digit on a large canvas)."""
    return max(512, 16 * max(height, width))


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    # Wide modes become 8 bits first, in single or integer precision: no float64 copies.
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint16, copy=False)  # native byte order
        image = Image.fromarray((array >> 8).astype(np.uint8))
    elif image.mode == "I":
        high = image.getextrema()[1]
        scale = 255.0 / max(float(high), 1.0)  # type: ignore[arg-type]
        image = image.point(lambda v: v * scale).convert("L")  # type: ignore[arg-type,operator]
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8))
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
    image: Image.Image,
    channels: int,
    height: int,
    width: int,
    fit: Fit | None = None,
    report: FitReport | None = None,
) -> tuple[np.ndarray, FitReport]:
    """float32 ``[C, H, W]`` in [0, 1] and how it was made: colour mode converted, then fitted
    as the model's metadata says (``fit``; ``None`` or ``stretch``: resized to the model's
    size with bilinear resampling). ``report`` continues one begun while decoding."""
    report = report or report_for(image)
    converted = _to_mode(image, "L" if channels == 1 else "RGB")
    if converted.mode != image.mode:
        report.steps.append(f"converted {image.mode} to {converted.mode}")
    if fit is not None and fit.method == "digit" and channels == 1:
        report.method = "digit"
        return fit_digit(converted, height, width, fit, report)[None], report
    return stretch(converted, height, width, report), report


def preprocess(
    data: bytes, channels: int, height: int, width: int, max_pixels: int, fit: Fit | None = None
) -> tuple[np.ndarray, FitReport]:
    """Decode ``data`` (reduced early to what the model can use) and make it the model's input
    (``to_input``)."""
    return decode_to_input(open_image(data, max_pixels), channels, height, width, fit)


def decode_to_input(
    image: Image.Image, channels: int, height: int, width: int, fit: Fit | None
) -> tuple[np.ndarray, FitReport]:
    """Decode an opened image, reduced early to what the model can use, into its input."""
    report = report_for(image)
    size = image.size
    image = load(image, work_size(height, width))
    if image.size != size:
        report.steps.append(f"reduced to {image.width}x{image.height} while decoding")
    return to_input(image, channels, height, width, fit, report)
