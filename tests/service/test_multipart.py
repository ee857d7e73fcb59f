"""The multipart reader of /predict: the same parts as Starlette's parser on bodies written by
a real HTTP client, and a clear error for every malformed body."""

import asyncio

import httpx
import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from convserve.service import multipart


def _encode(files, data=None) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x/predict", files=files, data=data)
    return request.headers["content-type"], request.read()


def _starlette(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    async def stream():
        yield body

    async def parse():
        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
        out = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((name, value.filename, await value.read()))
            else:
                out.append((name, None, value.encode()))
        await form.close()
        return out

    return asyncio.run(parse())


BODIES = {
    "one file": ({"file": ("x.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image/png")}, None),
    "several files": (
        [
            ("files", ("a.png", b"a" * 10, "image/png")),
            ("files", ("b.jpg", b"b" * 3, "image/jpeg")),
        ],
        None,
    ),
    "file and fields": ({"file": ("d.bmp", b"BM\r\n--not a boundary", "")}, {"note": "hi"}),
    "quoted name": ({"file": ('we "said"; x.png', b"123", "image/png")}, None),
    "utf-8 name": ({"file": ("zéro ✓.png", b"\r\n\r\n", "image/png")}, None),
    "empty file": ({"file": ("e.png", b"", "image/png")}, None),
}


@pytest.mark.parametrize("name", BODIES)
def test_parts_equal_starlettes_on_real_client_bodies(name):
    files, data = BODIES[name]
    content_type, body = _encode(files, data)
    parts = multipart.parse(body, multipart.boundary(content_type), max_parts=10)
    got = [(p.name, p.filename, p.data) for p in parts]
    assert sorted(got) == sorted(_starlette(content_type, body))


def test_preamble_and_epilogue_are_ignored():
    body = (
        b'a preamble\r\n--B\r\nContent-Disposition: form-data; name="file"; '
        b'filename="x"\r\n\r\nDATA\r\n--B--\r\nan epilogue'
    )
    (part,) = multipart.parse(body, b"B", max_parts=4)
    assert (part.name, part.filename, part.data) == ("file", "x", b"DATA")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no boundary at all", "does not start"),
        (b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\ncut', "not closed"),
        (b"--B\r\nContent-Type: image/png\r\n\r\nx\r\n--B--", "no Content-Disposition"),
        (b"--B\r\nContent-Disposition: attachment\r\n\r\nx\r\n--B--", "not form-data"),
        (b"--B\r\nContent-Disposition: form-data; name=a", "do not end"),
        (b"--Bjunk\r\n\r\nx\r\n--B--", "malformed"),
    ],
)
def test_malformed_bodies_say_what_is_wrong(body, message):
    with pytest.raises(multipart.MultipartError, match=message):
        multipart.parse(body, b"B", max_parts=4)


def test_the_number_of_parts_is_bounded():
    content_type, body = _encode([("files", (f"{i}.png", b"x", "image/png")) for i in range(5)])
    with pytest.raises(multipart.MultipartError, match="more than 4 parts"):
        multipart.parse(body, multipart.boundary(content_type), max_parts=4)


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        ("application/json", multipart.NotMultipart),
        (None, multipart.NotMultipart),
        ("multipart/form-data", multipart.MultipartError),
        ("multipart/form-data; boundary=" + "x" * 300, multipart.MultipartError),
    ],
)
def test_the_content_type_must_be_multipart_with_a_boundary(content_type, error):
    with pytest.raises(error):
        multipart.boundary(content_type)


def test_header_parameters_are_read_as_python_multipart_reads_them():
    """``options_header`` splits the common forms itself: the same answer as
    ``parse_options_header`` on every header built from these pieces, and on real ones."""
    import itertools
    import random

    from python_multipart.multipart import parse_options_header

    from convserve.service.multipart import options_header

    pieces = [
        "form-data", " Form-Data ", "multipart/form-data", "name=file", ' name="file"',
        'filename="x.png"', "filename=x.png", 'filename="a;b.png"', 'filename="a\\"b.png"',
        'filename="C:\\\\dir\\\\x.png"', "filename*=UTF-8''%C3%A9.png", "", " ", "\t",
        'boundary="----x"', "boundary=abc", "BOUNDARY=Abc", 'x="', 'y=""', "novalue", "a=b=c",
        'name="é"', "name=\"a'b\"",
    ]  # fmt: skip
    rng = random.Random(0)
    headers = [";".join(p) for p in itertools.product(pieces[:4], pieces, pieces)]
    headers += [";".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(3000)]
    headers += ["multipart/form-data; boundary=convservebench", None, ""]
    for header in headers:
        for value in (header, header.encode("latin-1") if header else header):
            assert options_header(value) == parse_options_header(value), value
