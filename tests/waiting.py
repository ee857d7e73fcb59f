"""Waiting in tests: always on a condition, never a fixed sleep, and every limit multiplied by
one factor, ``CONVSERVE_TEST_SLOWDOWN`` (default 1), for a machine that is busy with other
work: ``CONVSERVE_TEST_SLOWDOWN=3 make test``."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def _slowdown() -> float:
    raw = os.environ.get("CONVSERVE_TEST_SLOWDOWN", "") or "1"
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"CONVSERVE_TEST_SLOWDOWN={raw!r} is not a number") from None
    if factor < 1:
        raise ValueError(f"CONVSERVE_TEST_SLOWDOWN={raw!r}: give a factor of 1 or more")
    return factor


SLOWDOWN = _slowdown()
# What tests keep for a person to look at (the web page's screenshots), outside the checkout
ARTIFACTS = Path(
    os.environ.get("CONVSERVE_TEST_ARTIFACTS")
    or Path(tempfile.gettempdir()) / "convserve-test-artifacts"
)


def limit(seconds: float) -> float:
    """A time limit of ``seconds`` on a quiet machine, as it applies on this one."""
    return seconds * SLOWDOWN


def limit_ms(seconds: float) -> float:
    """``limit`` in milliseconds (Playwright's unit)."""
    return limit(seconds) * 1000


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``condition`` until it answers something true, and return that; fail with
    ``what`` after ``limit(timeout)`` seconds."""
    deadline = time.monotonic() + limit(timeout)
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit(timeout):.0f} s")
        time.sleep(interval)
