"""Credentials out of text: what a log line, an answer, a page or an MLflow tag may show of a
URI. ``http://user:password@host`` keeps the user and loses the password; a query parameter
that carries a secret (``?token=``, ``&X-Amz-Signature=``, ...) loses its value.

    >>> redact("http://admin:s3cret@mlflow:5000/api?token=abc&page=2")
    'http://admin:***@mlflow:5000/api?token=***&page=2'
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://user:password@ -- the password is everything up to the last "@" before the host
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)[^\s/'\"]*@")
_SECRET_PARAMS = (
    "token|access_token|refresh_token|id_token|api_key|apikey|key|password|passwd|pwd|secret|"
    "client_secret|sig|signature|auth|authorization|credential|sas|"
    "x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
)
_QUERY = re.compile(rf"(?i)(?P<head>[?&;](?:{_SECRET_PARAMS})=)[^&;#\s'\"]+")


def redact(text: str) -> str:
    """``text`` with every password in a URI's user part and every secret query value
    replaced by ``***``."""
    if "@" not in text and "=" not in text:  # the common case: nothing to look at
        return text
    return _QUERY.sub(rf"\g<head>{MASK}", _USERINFO.sub(rf"\g<head>{MASK}@", text))


def error_line(err: BaseException, limit: int = 600) -> str:
    """``err`` in one redacted line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return redact(f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__)


def redacted(value: Any) -> Any:
    """``redact`` through strings, lists and dicts (a JSON-like value)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(v) for v in value)
    return value
