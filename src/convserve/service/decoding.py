"""Where uploads are decoded: small images on the event loop, large ones in their own bounded
pool, never more than ``CONVSERVE_MAX_LARGE_DECODES`` at once.

Which is which is decided by the pixel count in the image's header, not by the upload's size:
a 24 KB PNG can hold 25 million pixels. A large decode that finds every slot taken waits a
moment, then is answered 503 with ``Retry-After``, so that memory stays bounded by the slots
times the pixel limit, whatever the number of clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from convserve.contract import Fit
from convserve.processes import give_back_freed_memory
from convserve.service.fitting import FitReport
from convserve.service.imaging import decode_to_input, open_image
from convserve.service.settings import Settings

log = logging.getLogger(__name__)

INLINE_PIXELS = 256 * 256  # decodes in well under a millisecond: a thread hop costs more
SLOT_WAIT_SECONDS = 1.0  # how long a large decode waits for a free slot before a 503


class DecoderBusy(Exception):
    """Every large-decode slot is taken."""


class Decoder:
    def __init__(self, settings: Settings) -> None:
        self.max_pixels = settings.max_pixels
        self.slots_total = settings.max_large_decodes
        self.pool = ThreadPoolExecutor(self.slots_total, thread_name_prefix="convserve-decode")
        self.slots = asyncio.Semaphore(self.slots_total)
        # heavy requests' decoding and encoding, one at a time (``admission.py``)
        self.heavy = ThreadPoolExecutor(
            1,
            thread_name_prefix="convserve-heavy",
            initializer=lower_priority,
            initargs=(settings.heavy_niceness,),
        )

    def prepare_now(
        self, data: bytes, channels: int, height: int, width: int, fit: Fit | None
    ) -> tuple[np.ndarray, FitReport]:
        """``prepare`` in the calling thread, whatever the image's size (the heavy thread)."""
        image = open_image(data, self.max_pixels)
        if image.width * image.height <= INLINE_PIXELS:
            return decode_to_input(image, channels, height, width, fit)
        return _finish_large(image, channels, height, width, fit)

    async def prepare(
        self, data: bytes, channels: int, height: int, width: int, fit: Fit | None
    ) -> tuple[np.ndarray, FitReport]:
        """The model's input for one upload, and how it was fitted; ``ImageError`` for a bad
        upload, ``DecoderBusy`` when large decodes are all taken."""
        image = open_image(data, self.max_pixels)  # the header only
        args = (image, channels, height, width, fit)
        if image.width * image.height <= INLINE_PIXELS:
            return decode_to_input(*args)
        try:
            await asyncio.wait_for(self.slots.acquire(), SLOT_WAIT_SECONDS)
        except TimeoutError:
            raise DecoderBusy from None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, _finish_large, *args)
        finally:
            self.slots.release()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.heavy.shutdown(wait=False, cancel_futures=True)


def _finish_large(
    image: Image.Image, channels: int, height: int, width: int, fit: Fit | None
) -> tuple[np.ndarray, FitReport]:
    try:
        return decode_to_input(image, channels, height, width, fit)
    finally:
        give_back_freed_memory()  # the large decode's


def lower_priority(niceness: int) -> None:
    """The heavy thread's scheduling priority lowered (Linux: a thread's own nice value), so
    that when the cores are short, light requests' threads run first
    (``CONVSERVE_HEAVY_NICENESS``)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
