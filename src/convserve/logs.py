"""The format of every log line convserve writes: a UTC timestamp, the level, the logger and
the message, with credentials redacted (``redact.py``); ``CONVSERVE_LOG_FORMAT=json`` writes
one JSON object a line instead, for log collectors (Loki, Fluent Bit, CloudWatch).

    2026-12-05T15:40:01.123Z INFO    convserve.service: serving convserve version 3 on CPU...
    {"time": "2026-12-05T15:40:01.123Z", "level": "INFO", "logger": "convserve.service", ...}
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from convserve.redact import redact

LOG_FORMAT = "CONVSERVE_LOG_FORMAT"
FORMATS = ("text", "json")
# a line that starts with this already carries its time (``convserve up`` stamps the others)
STAMPED = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d|\{"time": )')


def log_format() -> str:
    """``CONVSERVE_LOG_FORMAT``: text (the default) or json."""
    kind = os.environ.get(LOG_FORMAT, "text").strip().lower() or "text"
    if kind not in FORMATS:
        raise ValueError(f"{LOG_FORMAT}={kind!r}: use one of {', '.join(FORMATS)}")
    return kind


def timestamp(seconds: float | None = None) -> str:
    """ISO 8601 in UTC to the millisecond."""
    seconds = time.time() if seconds is None else seconds
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds % 1 * 1000):03d}Z"


class Formatter(logging.Formatter):
    """Text or JSON lines (``kind``; None: ``CONVSERVE_LOG_FORMAT``), redacted; ``message``:
    the logger and message only, for a handler that shows the time and level (rich's)."""

    def __init__(self, kind: str | None = None, **_: Any) -> None:
        super().__init__()
        self.kind = kind or log_format()

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        trace = ""
        if record.exc_info:
            trace = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            trace = redact(record.exc_text)
        if self.kind == "json":
            line: dict[str, Any] = {
                "time": timestamp(record.created),
                "level": record.levelname,
                "logger": record.name,
                "message": message,
                "pid": record.process,
            }
            if trace:
                line["exception"] = trace
            return json.dumps(line, ensure_ascii=False)
        if self.kind == "message":  # for a handler that shows the time and level itself
            text = f"{record.name}: {message}"
        else:
            text = f"{timestamp(record.created)} {record.levelname:<7} {record.name}: {message}"
        return f"{text}\n{trace}" if trace else text


def handler(stream: Any = None) -> logging.Handler:
    out = logging.StreamHandler(stream)
    out.setFormatter(Formatter())
    return out


def configure(level: int = logging.INFO) -> None:
    """The root logger on stderr in this format (a process's first call wins)."""
    logging.basicConfig(level=level, handlers=[handler()])


def warn_on_change(
    logger: logging.Logger, error: str, before: str | None, retry_seconds: float
) -> None:
    """A failure tried again every ``retry_seconds``: warned of when it starts or its reason
    changes, not at every try while it lasts."""
    if error != before:
        logger.warning("%s; trying again every %g s", error, retry_seconds)


def stamp(line: str, kind: str = "text", source: str = "") -> str:
    """A line of a program's output with a timestamp in front, unless it has one; ``json``:
    as a JSON object from ``source`` (the program)."""
    if STAMPED.match(line):
        return line
    if kind == "json":
        record = {"time": timestamp(), "level": "INFO", "logger": source, "message": line}
        return json.dumps(record, ensure_ascii=False)
    return f"{timestamp()} {line}"
