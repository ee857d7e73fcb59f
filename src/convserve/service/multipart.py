"""A ``multipart/form-data`` body split into its parts (RFC 7578), in one pass over bytes.

``/predict`` reads its uploads with this instead of Starlette's form parser, which writes each
file into a spooled temporary file and reads it back: an upload is copied once here (its slice
of the body), and the parse is a few ``bytes.find`` calls, where the event-driven parser costs
more than decoding a small image. The body's size is bounded before it gets here
(``CONVSERVE_MAX_UPLOAD_BYTES``), and the uploads are read whole to be decoded anyway.
Header parameters are read as python-multipart's ``parse_options_header`` reads them (quoting
as browsers and HTTP clients write it): plain ``key=value`` and ``key="value"`` parameters
here, anything with a backslash or a quoted ``;`` by ``parse_options_header`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

MAX_HEADER_BYTES = 8 * 1024  # one part's headers


class MultipartError(ValueError):
    """A body that is not well-formed ``multipart/form-data``."""


class TooManyParts(MultipartError):
    """A well-formed body with more parts than allowed."""


class NotMultipart(MultipartError):
    """A body of another content type."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: a plain field, not a file
    data: bytes


def options_header(value: str | bytes | None) -> tuple[bytes, dict[bytes, bytes]]:
    """A header's value and its parameters, lower-cased value and names, as python-multipart's
    ``parse_options_header`` gives them; the common forms (no backslash, no ``;`` inside quotes)
    are split here, in a fraction of its time."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    parts = text.split(";") if text and "\\" not in text else []
    if not parts or any(part.count('"') % 2 for part in parts):  # a quoted ";", an escape
        return parse_options_header(value)
    kind, *segments = parts
    options: dict[bytes, bytes] = {}
    for segment in segments:
        key, equals, item = segment.partition("=")
        key = key.strip(" \t")
        if equals:
            key, item = key.lower(), item.strip(" \t")
        if "*" in key:  # RFC 7578 forbids the extended (key*=) syntax: ignored
            continue
        if len(item) >= 2 and item[0] == '"' and item[-1] == '"':
            item = item[1:-1]
        options[key.encode("latin-1")] = item.encode("latin-1")
    return kind.strip(" \t").lower().encode("latin-1"), options


def boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type."""
    kind, options = options_header(content_type)
    if kind != b"multipart/form-data":
        raise NotMultipart(
            f"the body is {kind.decode('latin-1') or 'of no content type'}, not multipart/form-data"
        )
    found = options.get(b"boundary")
    if not found or len(found) > 256:
        raise MultipartError("the multipart Content-Type has no usable boundary")
    return found


def parse(body: bytes, boundary: bytes, max_parts: int) -> list[Part]:
    """Every part of ``body`` in order; ``MultipartError`` for a malformed body or more than
    ``max_parts`` parts."""
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise MultipartError("the body does not start with its multipart boundary")
    pos = start + len(delimiter)
    parts: list[Part] = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        if len(parts) == max_parts:
            raise TooManyParts(f"more than {max_parts} parts in one body")
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise MultipartError("a multipart boundary line is malformed or the body is cut")
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end < 0 or head_end - line_end > MAX_HEADER_BYTES:
            raise MultipartError("a part's headers do not end, or are too long")
        data_end = body.find(separator, head_end + 4)
        if data_end < 0:
            raise MultipartError("a part is not closed by the boundary (the body is cut)")
        name, filename = _disposition(body[line_end + 2 : head_end])
        parts.append(Part(name, filename, body[head_end + 4 : data_end]))
        pos = data_end + len(separator)
    return parts


def _disposition(headers: bytes) -> tuple[str, str | None]:
    for line in headers.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == b"content-disposition":
            kind, options = options_header(value.strip())
            if kind != b"form-data" or b"name" not in options:
                raise MultipartError("a part's Content-Disposition is not form-data with a name")
            filename = options.get(b"filename")
            return _text(options[b"name"]), None if filename is None else _text(filename)
    raise MultipartError("a part has no Content-Disposition header")


def _text(value: bytes) -> str:
    """Header text as browsers send it: UTF-8, else Latin-1 (never an error)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
