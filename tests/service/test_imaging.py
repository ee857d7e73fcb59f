import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from convserve.service.imaging import ImageError, decode, preprocess, to_input


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _image(mode: str) -> Image.Image:
    base = Image.linear_gradient("L").resize((40, 30))
    if mode == "I;16":
        return Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype(np.uint16))
    return base.convert(mode)


CASES = [("PNG", m) for m in ("L", "LA", "RGB", "RGBA", "P", "I;16")] + [
    ("JPEG", "L"),
    ("JPEG", "RGB"),
    ("JPEG", "CMYK"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
    ("BMP", "RGB"),
    ("BMP", "P"),
    ("GIF", "P"),
    ("GIF", "L"),
    ("TIFF", "RGB"),
    ("TIFF", "CMYK"),
    ("TIFF", "I;16"),
    ("TIFF", "LA"),
]


@pytest.mark.parametrize(("fmt", "mode"), CASES)
@pytest.mark.parametrize("channels", [1, 3])
def test_formats_and_modes_become_the_model_input(fmt, mode, channels):
    data = _encode(_image(mode), fmt)
    x, report = preprocess(data, channels, 8, 12, max_pixels=10_000)
    assert x.shape == (channels, 8, 12) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x[:, -1, :].mean() > x[:, 0, :].mean() + 0.3  # the gradient survives every path
    assert (
        report.method == "stretch" and report.format == fmt and report.original.startswith("40x30")
    )


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_the_input_is_every_pixel_over_255_channels_first(mode, channels):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 7, 3) if channels == 3 else (9, 7), dtype=np.uint8)
    x, report = to_input(Image.fromarray(pixels, mode), channels, 9, 7)
    expected = pixels.astype(np.float32) * np.float32(1 / 255)
    expected = expected.transpose(2, 0, 1) if channels == 3 else expected[None]
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
    np.testing.assert_array_equal(x, expected)  # exact: the same float32 values
    assert report.steps == []  # nothing stretched or converted


def test_sixteen_bit_is_scaled_by_its_full_range():
    data = _encode(_image("I;16"), "PNG")
    x, _ = preprocess(data, 1, 30, 40, max_pixels=10_000)
    assert x.max() > 0.9  # not clipped to 255/65535


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(fmt):
    image = Image.new("L", (20, 10), 0)
    image.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    decoded = decode(data, 10_000)
    assert decoded.size == (10, 20)
    x, _ = to_input(decoded, 1, 20, 10)
    assert x[0, :10].mean() > 0.8 and x[0, 10:].mean() < 0.2  # white on top after rotation


def test_gif_uses_the_first_frame():
    frames = [Image.new("L", (8, 8), v) for v in (200, 10)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    x, _ = preprocess(buf.getvalue(), 1, 8, 8, 10_000)
    assert x.mean() > 0.7


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header():
    for width, height in [(100_000, 100_000), (10_000, 10_000)]:  # PIL's limit, then ours
        with pytest.raises(ImageError, match="limit") as err:
            decode(png_bomb(width, height), max_pixels=40_000_000)
        assert err.value.status == 413 and "CONVSERVE_MAX_PIXELS" in str(err.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (_encode(Image.new("RGB", (64, 64), "red"), "PNG")[:80], "truncated or corrupt"),
        (b"%PDF-1.4 fake", "not an image"),
    ],
)
def test_bad_uploads_get_clear_errors(data, message):
    with pytest.raises(ImageError, match=message) as err:
        decode(data, 10_000)
    assert err.value.status == 422
