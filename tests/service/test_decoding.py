"""Decoding by the header's pixel count: small images inline, large ones in a bounded pool,
reduced early, and a 503 when every large-decode slot is taken."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from convserve.service import decoding
from convserve.service.decoding import Decoder, DecoderBusy
from convserve.service.imaging import ImageError
from convserve.service.settings import Settings


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 40).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_large_images_decode_in_their_own_pool_and_small_ones_inline(monkeypatch):
    threads: list[str] = []
    real = decoding.decode_to_input

    def spy(*args):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(decoding, "decode_to_input", spy)

    async def scenario() -> None:
        decoder = Decoder(Settings(model_uri="m.onnx"))
        # 24 KB of PNG, 25 million pixels: large by its header, whatever its bytes
        big = _png((5000, 5000))
        assert len(big) < 100_000
        x, report = await decoder.prepare(big, 1, 28, 28, None)
        assert x.shape == (1, 28, 28) and "reduced to 556x556 while decoding" in report.steps
        await decoder.prepare(_png((64, 64)), 1, 28, 28, None)
        decoder.close()

    asyncio.run(scenario())
    assert threads[0].startswith("convserve-decode") and threads[1] == "MainThread"


def test_a_jpeg_decodes_at_a_reduced_scale():
    from convserve.service.imaging import load, open_image

    image = load(open_image(_jpeg((4000, 3000)), 40_000_000), work=512)
    assert max(image.size) <= 1024 and image.format == "JPEG"  # draft, then reduce


def test_every_slot_taken_is_a_busy_answer_small_images_still_pass(monkeypatch):
    monkeypatch.setattr(decoding, "SLOT_WAIT_SECONDS", 0.2)

    async def scenario() -> None:
        decoder = Decoder(Settings(model_uri="m.onnx", max_large_decodes=1))
        await decoder.slots.acquire()  # another large decode holds the only slot
        with pytest.raises(DecoderBusy):
            await decoder.prepare(_png((1000, 1000)), 1, 28, 28, None)
        x, _ = await decoder.prepare(_png((32, 32)), 1, 28, 28, None)
        assert x.shape == (1, 28, 28)
        decoder.slots.release()
        x, _ = await decoder.prepare(_png((1000, 1000)), 1, 28, 28, None)
        assert np.allclose(x, 40 / 255, atol=0.01)
        decoder.close()

    asyncio.run(scenario())


def test_the_pixel_limit_is_checked_from_the_header():
    async def scenario() -> None:
        decoder = Decoder(Settings(model_uri="m.onnx", max_pixels=1_000_000))
        with pytest.raises(ImageError, match="CONVSERVE_MAX_PIXELS") as err:
            await decoder.prepare(_png((2000, 1000)), 1, 28, 28, None)
        assert err.value.status == 413
        decoder.close()

    asyncio.run(scenario())


def test_sixteen_bit_images_become_eight_bit_without_float_copies():
    big = np.full((3000, 2000), 40_000, np.uint16)

    async def scenario() -> None:
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, "PNG")
        decoder = Decoder(Settings(model_uri="m.onnx"))
        x, report = await decoder.prepare(buf.getvalue(), 1, 28, 28, None)
        assert np.allclose(x, (40_000 >> 8) / 255, atol=0.01)
        assert report.original == "2000x3000 I;16"
        decoder.close()

    asyncio.run(scenario())
